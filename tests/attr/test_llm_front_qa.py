"""QA findings on ``taylor_kernels.captum.LLMGradientAttribution`` and
``tk.generation_attribution``, each checked against Captum 0.9 on tiny random-weight models:
a ``TextTokenInput`` subclass with its own ``to_model_input``, an LM head with fewer outputs
than the embedding has rows, the default continuation under the model's
``generation_config``, ``[OVERLAP]`` output tokens of a character cut mid-bytes, Captum's
``forward_func`` / ``SUPPORTED_METHODS``, train-mode dropout draws, and
``return_dict_in_generate``."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
ca = pytest.importorskip("captum.attr")

import taylor_kernels.captum as tkc  # noqa: E402
from taylor_kernels.attr.generation import generation_attribution  # noqa: E402
from taylor_kernels.models import tiny  # noqa: E402
from tests.attr.test_captum_llm_loop import PROMPT, TARGET, tok  # noqa: E402,F401
from tests.attr.test_low_precision import one_thread  # noqa: E402,F401  (autouse: 1 thread)


@pytest.fixture(scope="module")
def gpt2(tok):
    return tiny.gpt2(layers=2, d=32, vocab=len(tok))


def _attribute(mod, model, tok, inp, **kwargs):
    """``mod.LLMGradientAttribution`` over ``mod``'s layer IG on the input embeddings."""
    lig = mod.LayerIntegratedGradients(model, model.get_input_embeddings())
    return mod.LLMGradientAttribution(lig, tok).attribute(inp, **kwargs)


def _close(got, want):
    """Token by token to 1e-5 of the largest attribution, same tokens."""
    assert got.input_tokens == want.input_tokens and got.output_tokens == want.output_tokens
    scale = want.token_attr.abs().max()
    assert scale > 1e-4
    torch.testing.assert_close(got.token_attr, want.token_attr, rtol=0, atol=1e-5 * scale)


def _alternating_baselines(base):
    """A ``base`` (a ``TextTokenInput`` class) subclass whose ``to_model_input`` puts ``<unk>``
    (id 1) at absent even features and ``<pad>`` (id 0) at absent odd ones."""
    def to_model_input(self, perturbed=None):
        ids = base.to_model_input(self, perturbed)
        if perturbed is None:
            return ids
        alt = (torch.arange(perturbed.shape[1]) % 2 == 0).long().expand_as(perturbed)
        itp = self.itp_tensor.expand(perturbed.shape[0], -1).clone()
        itp[perturbed != 1] = alt[perturbed != 1]
        out = ids.clone()
        mask = torch.ones_like(ids, dtype=torch.bool) if self.itp_mask is None \
            else self.itp_mask.expand_as(ids)
        out[mask] = itp.reshape(-1)
        return out
    return type("Alternating" + base.__module__.split(".")[0], (base,),
                {"to_model_input": to_model_input})


@pytest.mark.parametrize("base", ["captum", "ours"])
def test_a_subclass_with_its_own_to_model_input_equals_captum(base, gpt2, tok):
    cls = _alternating_baselines((ca if base == "captum" else tkc).TextTokenInput)
    want = _attribute(ca, gpt2, tok, _alternating_baselines(ca.TextTokenInput)(
        PROMPT, tok, skip_tokens=["<s>"]), target=TARGET, n_steps=8)
    stock = _attribute(ca, gpt2, tok, ca.TextTokenInput(PROMPT, tok, skip_tokens=["<s>"]),
                       target=TARGET, n_steps=8)
    assert (want.token_attr - stock.token_attr).abs().max() > 1e-3  # the subclass matters
    _close(_attribute(tkc, gpt2, tok, cls(PROMPT, tok, skip_tokens=["<s>"]), target=TARGET,
                      n_steps=8), want)
    with tkc.patched():
        _close(_attribute(ca, gpt2, tok, cls(PROMPT, tok, skip_tokens=["<s>"]),
                          target=TARGET, n_steps=8), want)


def test_an_lm_head_smaller_than_the_embedding_equals_captum(tok):
    model = tiny.llama(layers=1, d=32, vocab=len(tok) + 8)
    torch.manual_seed(1)
    model.lm_head = torch.nn.Linear(32, len(tok), bias=False)  # no extra input-only ids
    model.config.tie_word_embeddings = False
    want = _attribute(ca, model, tok, ca.TextTokenInput(PROMPT, tok), target=TARGET, n_steps=4)
    _close(_attribute(tkc, model, tok, tkc.TextTokenInput(PROMPT, tok), target=TARGET,
                      n_steps=4), want)
    prompt = torch.tensor(tok.encode(PROMPT))
    outside = torch.tensor([5, len(tok) + 2])  # an embedding row the head cannot predict
    with pytest.raises(IndexError, match=f"id {len(tok) + 2} .* LM head's {len(tok)} outputs"):
        generation_attribution(model, prompt, outside, steps=2)
    with pytest.raises(IndexError, match="LM head's"):
        _attribute(tkc, model, tok, tkc.TextTokenInput(PROMPT, tok), target=outside,
                   n_steps=2, attribute_to_layer_input=False)  # the per-token loop too


def test_the_default_continuation_follows_the_generation_config(gpt2, tok):
    prompt = torch.tensor(tok.encode(PROMPT))
    config = gpt2.generation_config
    saved = config.repetition_penalty, config.no_repeat_ngram_size
    config.repetition_penalty, config.no_repeat_ngram_size = 3.0, 1
    try:
        want = gpt2.generate(input_ids=prompt[None], max_new_tokens=4, do_sample=False)
        got = generation_attribution(gpt2, prompt, max_new_tokens=4, steps=2)
    finally:
        config.repetition_penalty, config.no_repeat_ngram_size = saved
    assert got.target_ids.tolist() == want[0, prompt.shape[0]:].tolist()


def test_output_tokens_of_a_character_cut_mid_bytes_are_captums():
    from captum.attr._core.llm_attr import _convert_ids_to_pretty_tokens

    from taylor_kernels.captum_front.llm import pretty_tokens

    tok = tiny.byte_level_tokenizer(["the cat sat on the mat", "emoji 😀 😺 🚀 done"])
    overlaps = 0
    for text in ["the cat 🦀", "the 🦀 cat", "🦀", "cat 😀🦀"]:
        for end in range(1, len(tok.encode(text)) + 1):
            ids = torch.tensor(tok.encode(text)[:end])
            ours = pretty_tokens(ids, tok)
            assert len(ours) == len(ids)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    theirs = _convert_ids_to_pretty_tokens(ids, tok)
            except IndexError:  # Captum's fallback reads past a split id at the end
                continue
            assert ours == theirs, (text, end)
            overlaps += any(t.endswith(" [OVERLAP]") for t in theirs)
    assert overlaps  # cases where Captum marks a split character


def test_forward_func_and_supported_methods_are_captums(gpt2, tok):
    emb = gpt2.get_input_embeddings()
    ours = tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(gpt2, emb), tok)
    theirs = ca.LLMGradientAttribution(ca.LayerIntegratedGradients(gpt2, emb), tok)
    assert ours.forward_func is theirs.forward_func is gpt2
    for method in (tkc.LayerIntegratedGradients(gpt2, emb), tkc.LayerGradientShap(gpt2, emb),
                   *(cls(gpt2, emb) for cls in theirs.SUPPORTED_METHODS)):
        assert isinstance(method, ours.SUPPORTED_METHODS)
        assert isinstance(method, tkc.LLMGradientAttribution.SUPPORTED_METHODS)
    assert not isinstance(tkc.IntegratedGradients(gpt2), ours.SUPPORTED_METHODS)


def test_a_train_mode_model_draws_dropout_as_captum(tok):
    model = tiny.gpt2(layers=1, d=32, vocab=len(tok)).train()
    results = []
    for mod in (ca, tkc):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(_attribute(mod, model, tok, mod.TextTokenInput(PROMPT, tok),
                                      target=TARGET, n_steps=4))
    _close(results[1], results[0])


def test_return_dict_in_generate_takes_the_sequences(gpt2, tok):
    inp = tkc.TextTokenInput(PROMPT, tok)
    gen = {"max_new_tokens": 2, "do_sample": False}
    plain = _attribute(tkc, gpt2, tok, inp, gen_args=gen, n_steps=2)
    as_dict = _attribute(tkc, gpt2, tok, inp, gen_args={**gen, "return_dict_in_generate": True},
                         n_steps=2)
    assert as_dict.output_tokens == plain.output_tokens and len(plain.output_tokens) == 2
    torch.testing.assert_close(as_dict.token_attr, plain.token_attr)
