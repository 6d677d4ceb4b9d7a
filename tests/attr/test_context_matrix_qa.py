"""Caller contexts from a QA matrix (2026-12-03): a caller's
``disable_saved_tensors_hooks`` block, a ``torch.compile``d causal LM attributed over a
continuation, token ids made under ``torch.inference_mode()``, and the refusal message of a
forward that changes the model's state."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import taylor_kernels as tk
from taylor_kernels.captum import LayerIntegratedGradients


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()


X = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

CALLS = {
    "integrated_gradients": lambda m: tk.integrated_gradients(m, X, target=1,
                                                              steps=8).attributions,
    "integrated_hessians": lambda m: tk.integrated_hessians(m, X, target=1,
                                                            steps=4).interactions,
    "hessian": lambda m: tk.hessian(lambda x: m(x)[:, 1], X),
    "taylor_decomposition": lambda m: tk.taylor_decomposition(m, X, target=1,
                                                              order=2).first_order,
    "front LayerIntegratedGradients": lambda m: LayerIntegratedGradients(m, m[0]).attribute(
        X, target=1, n_steps=8),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_calls_inside_disable_saved_tensors_hooks_run_and_leave_the_block_as_it_was(name):
    """The memory probes and row checks push saved-tensor hooks: inside the caller's block they
    raised the caller's message on a fresh model (and ran after a cached cost: by call
    history). They run now, equal to a plain call, and the block is still in force after."""
    plain = CALLS[name](_mlp())
    model = _mlp()
    with torch.autograd.graph.disable_saved_tensors_hooks("the caller's reason"):
        inside = CALLS[name](model)
        with pytest.raises(RuntimeError, match="the caller's reason"):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                pass
    torch.testing.assert_close(inside, plain, rtol=1e-12, atol=1e-12)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        pass  # (enabled again after the caller's block)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_generation_of_a_compiled_model_over_two_target_tokens():
    """The embedding's capture hook was ignored by the compiled graphs (compiled by the causal
    check's forwards before it): 'layer Embedding was never called'."""
    gpt = _gpt2()
    prompt, target = torch.tensor([[5, 7, 9]]), torch.tensor([[11, 12]])
    ref = tk.generation_attribution(gpt, prompt, target_ids=target, steps=8).token_attr
    torch._dynamo.reset()
    try:
        got = tk.generation_attribution(torch.compile(gpt, backend="eager"), prompt,
                                        target_ids=target, steps=8).token_attr
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_generation_target_ids_made_under_inference_mode():
    """A custom backward saved the inference-tensor targets: torch's 'Inference tensors
    cannot be saved for backward'."""
    gpt = _gpt2()
    prompt = torch.tensor([[5, 7, 9]])
    ref = tk.generation_attribution(gpt, prompt, target_ids=torch.tensor([[11, 12]]),
                                    steps=8).token_attr
    with torch.inference_mode():
        target = torch.tensor([[11, 12]])
    got = tk.generation_attribution(gpt, prompt, target_ids=target, steps=8).token_attr
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_a_forward_that_changes_the_model_is_named_in_the_refusal():
    """Old-style spectral norm in train mode moves the weight at every forward: the refusal
    said only 'random, e.g. dropout'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 8)), nn.Tanh(),
                          nn.Linear(8, 3)).train()
    with pytest.raises(ValueError, match="spectral_norm's power iteration in train mode"):
        tk.integrated_gradients(model, torch.randn(3, 4), target=1, steps=8)


@pytest.mark.parametrize("call", [
    lambda m, x: tk.integrated_hessians(m, x, target=1, steps=4, ig_steps=8),
    lambda m, x: tk.interactions(m, x, target=1),
    lambda m, x: tk.taylor_decomposition(m, x, target=1, order=2),
    lambda m, x: tk.hessian(lambda z: m(z)[:, 1], x),
])
def test_second_order_methods_refuse_row_coupling_inside_allow_row_coupling(call):
    """allow_row_coupling covers first-order path methods; the second-order ones failed with
    torch's 'Expected more than 1 value per channel' from their one-row forwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).train()
    x = torch.randn(3, 4)
    with tk.allow_row_coupling(model):
        tk.integrated_gradients(model, x, target=1, steps=4)  # (first order: runs)
        with pytest.raises(ValueError, match="batch statistics .*also inside allow_row_coupling"):
            call(model, x)


GLOBAL_MODEL = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("call", [
    lambda x: tk.jet(lambda z: GLOBAL_MODEL(z), x, torch.randn(3, 2, 4), order=2, target=1),
    lambda x: tk.hessian(lambda z: GLOBAL_MODEL(z)[:, 1], x),
    lambda x: tk.integrated_hessians(lambda z: GLOBAL_MODEL(z), x, target=1, steps=2,
                                     ig_steps=4),
])
def test_a_model_reached_through_a_global_is_seen_inside_allow_row_coupling(call):
    """A function calling a module-level model by name: the refusal above looked only at
    modules, closures and bound methods, so jet ran batch statistics silently and hessian /
    IH failed with torch's 'Expected more than 1 value per channel'."""
    GLOBAL_MODEL.train()
    with tk.allow_row_coupling(GLOBAL_MODEL):
        with pytest.raises(ValueError, match="batch statistics .*also inside allow_row_coupling"):
            call(torch.randn(3, 4))
