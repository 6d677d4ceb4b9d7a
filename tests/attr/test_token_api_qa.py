"""The token-level Hugging Face API, from a QA pass (2026-12-03): compiled models, forwards
taking the ids by position, the cache keyword, argument names in errors, numpy targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import taylor_kernels as tk

transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=80, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval()


IDS = torch.tensor([[5, 17, 42, 9, 33], [61, 7, 12, 70, 4]])


def _scores(model, **kw):
    return tk.token_integrated_gradients(model, IDS, target=3, baselines=9, steps=8,
                                         **kw).token_scores


def test_token_ig_of_a_compiled_model():
    """After the compiled model ran once, its graphs ignored the embedding's hooks: 'layer
    Embedding was never called'."""
    gpt = _gpt2()
    ref = _scores(gpt)
    ref_inter = tk.token_interactions(gpt, IDS, target=3, baselines=9, steps=4)["interactions"]
    torch._dynamo.reset()
    try:
        compiled = torch.compile(gpt, backend="eager")
        with torch.no_grad():
            compiled(input_ids=IDS)
        got = _scores(compiled)
        inter = tk.token_interactions(compiled, IDS, target=3, baselines=9, steps=4)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(inter["interactions"], ref_inter, rtol=1e-4, atol=1e-7)


def test_a_forward_taking_the_ids_by_position():
    """``forward(self, x)`` got ``input_ids=`` and raised inside the model (Captum calls the
    forward positionally; generation attribution already did)."""
    gpt = _gpt2()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(input_ids=x).logits

    got = _scores(Logits(gpt), layer="m.transformer.wte")
    torch.testing.assert_close(got, _scores(gpt), rtol=1e-6, atol=1e-8)


def test_the_cache_keyword_is_refused_and_the_callers_cache_untouched():
    """transformers 5.24 calls past_key_values ``cache``: the path's forwards grew the
    caller's cache in place (4 to 7 or 40 positions), then failed on sizes."""
    gpt = _gpt2()
    with torch.no_grad():
        cache = gpt(input_ids=IDS[:1, :4], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="model_kwargs must not hold cache"):
        tk.token_integrated_gradients(gpt, IDS[:1, 4:], target=3, steps=4,
                                      model_kwargs={"cache": cache})
    assert cache.get_seq_length() == 4


def test_generation_errors_name_prompt_ids():
    gpt = _gpt2()
    with pytest.raises(ValueError, match=r"do not broadcast to prompt_ids \(1, 5\)"):
        tk.generation_attribution(gpt, IDS[0], torch.tensor([3, 4]),
                                  baselines=torch.tensor([9] * 7), steps=4)


def test_numpy_targets_are_taken_as_torch_ones():
    gpt = _gpt2()
    ref = _scores(gpt)
    for target in (np.int64(3), np.array([3, 3])):
        got = tk.token_integrated_gradients(gpt, IDS, target=target, baselines=9,
                                            steps=8).token_scores
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)
    with pytest.raises(TypeError):
        tk.token_integrated_gradients(gpt, IDS, target=np.float64(3.0), baselines=9, steps=4)
