"""A model instance shared with other threads (a serving pool): while one thread's call has
the library's hooks on the model (layer outputs replaced by path points, captures, cached
activation derivatives), another thread's plain forward, gradient and Hessian-vector product
on the same instance must come out as without the call. Deterministic: the other thread runs
inside the call (from a pre-hook the test puts on the last block), and is joined there."""
from __future__ import annotations

import os
import threading

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

import taylor_kernels as tk  # noqa: E402
import taylor_kernels.captum as tkc  # noqa: E402
from taylor_kernels.models import tiny  # noqa: E402
from tests.attr.test_low_precision import one_thread  # noqa: E402,F401  (autouse: 1 thread)


def _other_thread_work(model, ids, v):
    """Plain logits, the input-embedding gradient and an HVP (double backward) of one row."""
    logits = model(input_ids=ids).logits
    e = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = torch.log_softmax(model(inputs_embeds=e).logits[:, -1], -1)[:, 3].sum()
    (g,) = torch.autograd.grad(out, e, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), e)
    return logits.detach(), g.detach(), hv


@pytest.fixture()
def gpt2():
    return tiny.gpt2(layers=2, d=32, heads=2, vocab=40, attn="eager")


def _interfered(model, ids, v):
    """A pre-hook on the last block: the first time it fires in this thread, the other
    thread's work runs to the end (joined) while the call's hooks are on the model."""
    results, owner = [], threading.get_ident()

    def pre(module, args):
        if threading.get_ident() == owner and not results:
            box = []
            worker = threading.Thread(target=lambda: box.append(_other_thread_work(model, ids, v)))
            worker.start()
            worker.join(30)
            results.append(box[0] if box else RuntimeError("the other thread raised"))

    return results, model.transformer.h[-1].register_forward_pre_hook(pre)


@pytest.mark.parametrize("call", ["generation", "token_ig", "front_layer_ig", "interactions"])
def test_a_thread_sharing_the_model_sees_no_hook_of_the_call(gpt2, call):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 40, (1, 7), generator=g)
    other_ids = torch.randint(4, 40, (1, 7), generator=g)
    v = torch.randn(1, 7, 32, generator=g)
    expected = _other_thread_work(gpt2, other_ids, v)
    results, handle = _interfered(gpt2, other_ids, v)
    try:
        if call == "generation":
            tk.generation_attribution(gpt2, ids[0, :4], ids[0, 4:], steps=4)
        elif call == "token_ig":
            tk.token_integrated_gradients(gpt2, ids, 5, steps=4)
        elif call == "front_layer_ig":
            def f(i):
                return torch.log_softmax(gpt2(i).logits[:, -1], -1)
            tkc.LayerIntegratedGradients(f, gpt2.get_input_embeddings()).attribute(
                ids, torch.zeros_like(ids), target=5, n_steps=4)
        else:
            tk.token_interactions(gpt2, ids, 5, steps=2)
    finally:
        handle.remove()
    assert results and not isinstance(results[0], Exception), results
    for got, want in zip(results[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_hook_acts_in_the_engine_threads_backward_only(monkeypatch):
    """``this_thread`` acts in the caller, and during a backward pass in the autograd engine's
    own threads (checkpointing recomputes the forward there; on CUDA the backward runs in a
    device thread), but not in another user thread, not even in its backward (on the CPU a
    backward runs in the thread that called it)."""
    from taylor_kernels.engine import thread_hooks

    calls = []
    hook = thread_hooks.this_thread(lambda *a: calls.append(threading.get_ident()) or 7)
    assert hook() == 7
    box = []

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            box.append(hook())  # as a checkpoint's recomputed forward would call it
            return grad * 2

    def other():
        box.append(hook())  # a forward in another thread
        x = torch.ones(2, requires_grad=True)
        Recompute.apply(x).sum().backward()

    for engine in (False, True):
        monkeypatch.setattr(thread_hooks, "_engine_thread", lambda engine=engine: engine)
        t = threading.Thread(target=other)
        t.start()
        t.join(5)
    assert box == [None, None, None, 7] and len(calls) == 2


def test_hooks_trace_under_torch_compile():
    """The thread test is not traced: a fully compiled model runs layer IG as eager does."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(3, 4)
    eager = tk.layer_integrated_gradients(net, net[0], x, target=0, steps=8).attributions
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    torch.testing.assert_close(
        tk.layer_integrated_gradients(compiled, net[0], x, target=0, steps=8).attributions,
        eager)
