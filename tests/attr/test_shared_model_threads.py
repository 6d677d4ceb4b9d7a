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


def test_a_hook_acts_in_backward_recomputation_on_another_thread():
    """``this_thread`` keeps acting inside a backward pass (checkpointing recomputes the
    forward there; on CUDA in the autograd engine's thread) and nowhere else."""
    from taylor_kernels.engine.thread_hooks import this_thread

    calls = []
    hook = this_thread(lambda *a: calls.append(threading.get_ident()) or 7)
    assert hook() == 7
    box = []
    t = threading.Thread(target=lambda: box.append(hook()))
    t.start()
    t.join(5)
    assert box == [None] and len(calls) == 1

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            box.append(hook())  # as a checkpoint's recomputed forward would call it
            return grad * 2

    def other():
        x = torch.ones(2, requires_grad=True)
        Recompute.apply(x).sum().backward()

    t = threading.Thread(target=other)
    t.start()
    t.join(5)
    assert box == [None, 7] and len(calls) == 2
