"""Captum's own ``LLMGradientAttribution`` runs on our engine under ``patch()`` and gives
Captum's numbers: over ``LayerIntegratedGradients`` as our one pass (one engine integral for
the whole continuation), over ``LayerGradientShap`` as the per-token loop, with Captum's
result type.

Captum's per-token loop passes ``additional_forward_args=(inp, target_tokens, cur_idx)`` with a
batch of one and ``target_tokens`` a ``[T]`` tensor: an argument with no batch dimension, which
the front binds into the forward function instead of selecting rows of it (a patched layer IG
called that way by other code: tested below through Captum's own loop).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
captum_attr = pytest.importorskip("captum.attr")

import taylor_kernels.captum as tkc  # noqa: E402
from taylor_kernels.captum_front._common import bind_unbatched_args  # noqa: E402
from taylor_kernels.engine import path_engine  # noqa: E402
from taylor_kernels.models import tiny  # noqa: E402

WORDS = "the cat sat on a mat dog ran far away and then slept quietly".split()


def test_llm_gradient_attribution_under_patch_equals_captum(monkeypatch):
    tok = tiny.word_tokenizer(WORDS)
    model = tiny.gpt2(layers=2, d=32, vocab=len(tok))

    def run():
        inp = captum_attr.TextTokenInput("the cat sat on a mat", tok, skip_tokens=["<s>"])
        lig = captum_attr.LayerIntegratedGradients(model, model.get_input_embeddings())
        llm = captum_attr.LLMGradientAttribution(lig, tok)
        return llm.attribute(inp, target="dog ran far", n_steps=8)

    passes = []
    integrate = path_engine.integrate
    monkeypatch.setattr(path_engine, "integrate",
                        lambda *a, **k: passes.append(1) or integrate(*a, **k))
    want = run()
    assert not passes  # Captum's own code ran
    with tkc.patched():
        got = run()
    assert len(passes) == 1  # one engine integral for the three target tokens
    assert type(got) is type(want) and got.output_tokens == want.output_tokens
    torch.testing.assert_close(got.seq_attr, want.seq_attr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.token_attr, want.token_attr, rtol=1e-5, atol=1e-6)
    assert not getattr(captum_attr.LLMGradientAttribution.attribute, "__taylor_kernels__",
                       False)  # unpatched after the block


def test_captums_per_token_loop_over_a_patched_layer_ig(monkeypatch):
    """Captum's LLM loop itself (its class's original attribute) over a patched layer IG:
    the [T] target ids Captum passes as a forward argument are bound, not row-selected."""
    tok = tiny.word_tokenizer(WORDS)
    model = tiny.gpt2(layers=2, d=32, vocab=len(tok))
    inp = captum_attr.TextTokenInput("the cat sat on a mat", tok, skip_tokens=["<s>"])
    original = captum_attr.LLMGradientAttribution.attribute
    want = captum_attr.LLMGradientAttribution(captum_attr.LayerIntegratedGradients(
        model, model.get_input_embeddings()), tok).attribute(inp, target="dog ran far",
                                                              n_steps=8)
    passes = []
    integrate = path_engine.integrate
    monkeypatch.setattr(path_engine, "integrate",
                        lambda *a, **k: passes.append(1) or integrate(*a, **k))
    with tkc.patched():
        llm = captum_attr.LLMGradientAttribution(captum_attr.LayerIntegratedGradients(
            model, model.get_input_embeddings()), tok)
        got = original(llm, inp, target="dog ran far", n_steps=8)
    assert len(passes) >= 3  # our engine, once per target token
    torch.testing.assert_close(got.token_attr, want.token_attr, rtol=1e-5, atol=1e-6)


def test_patched_llm_class_runs_the_loop_for_layer_gradient_shap():
    import numpy as np
    tok = tiny.word_tokenizer(WORDS)
    model = tiny.llama(layers=2, d=32, vocab=len(tok))
    inp = captum_attr.TextTokenInput("the cat sat on a mat", tok, skip_tokens=["<s>"])
    z = torch.zeros(1, inp.n_itp_features, dtype=torch.long)

    def run():
        torch.manual_seed(3)
        np.random.seed(3)
        llm = captum_attr.LLMGradientAttribution(captum_attr.LayerGradientShap(
            model, model.get_input_embeddings()), tok)
        return llm.attribute(inp, target="dog", baselines=z)  # one token: Captum reads it right

    want = run()
    with tkc.patched():
        got = run()
    assert type(got) is type(want)
    torch.testing.assert_close(got.token_attr, want.token_attr, rtol=1e-5, atol=1e-7)


def test_a_subclass_of_layer_ig_is_taken_and_its_own_attribute_runs(monkeypatch):
    """Captum takes any subclass of its layer IG (``isinstance``): one that changes nothing
    runs the one pass, one that overrides ``attribute`` runs the per-token loop through its
    own ``attribute`` (the one pass would bypass it); both equal Captum's numbers."""
    tok = tiny.word_tokenizer(WORDS)
    model = tiny.gpt2(layers=1, d=16, vocab=len(tok))
    calls = []

    class Same(captum_attr.LayerIntegratedGradients):
        pass

    class Logged(captum_attr.LayerIntegratedGradients):
        def attribute(self, *args, **kwargs):
            calls.append(1)
            return super().attribute(*args, **kwargs)

    class OursLogged(tkc.LayerIntegratedGradients):
        def attribute(self, *args, **kwargs):
            calls.append(2)
            return super().attribute(*args, **kwargs)

    def run(cls, llm_cls=captum_attr.LLMGradientAttribution):
        inp = captum_attr.TextTokenInput("the cat sat", tok, skip_tokens=["<s>"])
        return llm_cls(cls(model, model.get_input_embeddings()), tok).attribute(
            inp, target="on a mat", n_steps=5)

    want = run(captum_attr.LayerIntegratedGradients)
    passes = []
    integrate = path_engine.integrate
    monkeypatch.setattr(path_engine, "integrate",
                        lambda *a, **k: passes.append(1) or integrate(*a, **k))
    with tkc.patched():
        same = run(Same)
        assert len(passes) == 1 and not calls  # the one pass
        logged = run(Logged)
        assert calls == [1, 1, 1]  # its attribute, once per target token (Captum's code)
    ours = run(OursLogged, tkc.LLMGradientAttribution)
    assert calls[3:] == [2, 2, 2]
    for got in (same, logged, ours):
        torch.testing.assert_close(got.token_attr, want.token_attr, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="supports"):
        tkc.LLMGradientAttribution(tkc.IntegratedGradients(model), tok)


def test_bind_unbatched_args_keeps_positions_and_batched_args():
    seen = []

    def f(x, a, shared, flag):
        seen.append((a.shape, shared.shape, flag))
        return x.sum(1)

    shared = torch.arange(5)
    forward, rest = bind_unbatched_args(f, 1, (torch.ones(3, 2), shared, "k"), batch=3)
    assert len(rest) == 2 and rest[0].shape == (3, 2) and rest[1] == "k"
    forward(torch.ones(2, 4), torch.ones(2, 2), "k")
    assert seen == [((2, 2), (5,), "k")]
    # one owner per forward and bound shapes (a choice made for another shape is not this one)
    again, _ = bind_unbatched_args(f, 1, (torch.ones(3, 2), shared, "k"), batch=3)
    other, _ = bind_unbatched_args(f, 1, (torch.ones(3, 2), torch.ones(7, 5), "k"), batch=3)
    assert forward.cost_owner is again.cost_owner is not other.cost_owner
    same, args = bind_unbatched_args(f, 1, (torch.ones(3, 2), torch.ones(1, 4)), batch=3)
    assert same is f and len(args) == 2
