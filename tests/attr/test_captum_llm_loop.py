"""``taylor_kernels.captum.LLMGradientAttribution`` beyond the one pass: Captum's per-token loop
for LayerGradientShap / LayerGradientXActivation, layer IG with ``multiply_by_inputs=False`` or
its own ``attribute`` arguments, and a layer after the positions mix, equal to Captum's class
token by token (float32; LayerGradientShap against Captum's method on the right targets:
Captum 0.9's class repeats the target ids per sample and reads the wrong token for t >= 1)."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
ca = pytest.importorskip("captum.attr")

import taylor_kernels.captum as tkc  # noqa: E402
from taylor_kernels.captum_front import llm_per_token  # noqa: E402
from taylor_kernels.models import tiny  # noqa: E402
from tests.attr.test_low_precision import one_thread  # noqa: E402,F401  (autouse: 1 thread)

WORDS = "the cat sat on a mat dog ran far away and then slept quietly".split()
PROMPT, TARGET = "the cat sat on a mat", "dog ran far"


@pytest.fixture(scope="module")
def tok():
    return tiny.word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)  # RMSNorm: embedding gradients do not sum to ~0 as after LayerNorm
    return tiny.llama(layers=2, d=32, vocab=len(tok))


def _run(mod, tok, make, **kwargs):
    inp = mod.TextTokenInput(PROMPT, tok, baselines="<unk>", skip_tokens=["<s>"])
    torch.manual_seed(1)
    np.random.seed(1)
    llm = mod.LLMGradientAttribution(make(mod), tok)
    return llm, llm.attribute(inp, target=TARGET, **kwargs)


def _zeros(tok):
    return torch.zeros(1, ca.TextTokenInput(PROMPT, tok, skip_tokens=["<s>"]).n_itp_features,
                       dtype=torch.long)


CASES = {
    "lig_no_multiply": (lambda m, mod: mod.LayerIntegratedGradients(
        m, m.get_input_embeddings(), multiply_by_inputs=False), {"n_steps": 8}),
    "lig_baselines": (lambda m, mod: mod.LayerIntegratedGradients(
        m, m.get_input_embeddings()), {"n_steps": 8, "baselines": "zeros"}),
    "lig_first_block": (lambda m, mod: mod.LayerIntegratedGradients(
        m, m.model.layers[0]), {"n_steps": 8}),
    "lig_final_norm": (lambda m, mod: mod.LayerIntegratedGradients(
        m, m.model.norm), {"n_steps": 8}),
    "captum_gxa": (lambda m, mod: ca.LayerGradientXActivation(m, m.get_input_embeddings()), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_token_loop_equals_captum(case, model, tok, monkeypatch):
    make, kwargs = CASES[case]
    kwargs = {k: _zeros(tok) if v == "zeros" else v for k, v in kwargs.items()}
    _, want = _run(ca, tok, lambda mod: make(model, mod), **kwargs)
    loops = []
    real = llm_per_token.per_token_attributions
    monkeypatch.setattr("taylor_kernels.captum_front.llm.per_token_attributions",
                        lambda *a, **k: loops.append(1) or real(*a, **k))
    llm, got = _run(tkc, tok, lambda mod: make(model, mod), **kwargs)
    assert loops and llm.last_result is None and got.output_log_probs is None
    assert got.token_attr.shape == want.token_attr.shape == (3, 6)
    scale = want.token_attr.abs().max()
    assert scale > 1e-4
    torch.testing.assert_close(got.token_attr, want.token_attr, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(got.seq_attr, want.seq_attr, rtol=0, atol=3e-5 * scale)
    assert got.output_tokens == want.output_tokens


def test_layer_gradient_shap_attributes_each_target_token(model, tok):
    """Ours per token equals Captum's LayerGradientShap on the right target (same draws, same
    order); Captum's class agrees at t = 0, where its repeated target ids still read right."""
    z = _zeros(tok)
    _, ours = _run(tkc, tok, lambda mod: mod.LayerGradientShap(model, model.get_input_embeddings()),
                   baselines=z)
    _, captums = _run(ca, tok, lambda mod: mod.LayerGradientShap(model,
                                                                 model.get_input_embeddings()),
                      baselines=z)
    inp = ca.TextTokenInput(PROMPT, tok, baselines="<unk>", skip_tokens=["<s>"])
    targets = torch.tensor(tok.encode(TARGET, add_special_tokens=False))
    torch.manual_seed(1)
    np.random.seed(1)
    rows = []
    for t in range(len(targets)):
        forward = llm_per_token.TokenLogProb(model, torch.device("cpu"), inp, targets[:t + 1])
        attr = ca.LayerGradientShap(forward, model.get_input_embeddings()).attribute(
            inp.to_tensor().float(), baselines=z)
        rows.append(attr[:, :inp.inp_tensor.shape[1]].sum(-1))
    want = torch.cat(rows)[:, inp.itp_mask[0]]
    torch.testing.assert_close(ours.token_attr, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.token_attr[0], captums.token_attr[0], rtol=0, atol=1e-6)


def test_one_pass_stays_for_layer_ig_on_the_embeddings(model, tok, monkeypatch):
    monkeypatch.setattr("taylor_kernels.captum_front.llm.per_token_attributions",
                        lambda *a, **k: pytest.fail("the per-token loop ran"))
    llm, got = _run(tkc, tok, lambda mod: mod.LayerIntegratedGradients(
        model, model.get_input_embeddings()), n_steps=8)
    assert llm.last_result is not None and got.output_log_probs.shape == (3,)


@pytest.mark.filterwarnings("ignore:Multiple layers are attributed jointly")
def test_unsupported_methods_and_outputs_are_clear_errors(model, tok):
    with pytest.raises(AssertionError, match="supports LayerIntegratedGradients"):
        tkc.LLMGradientAttribution(tkc.IntegratedGradients(model), tok)
    with pytest.raises(TypeError, match="one layer"):
        tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(
            model, [model.model.layers[0], model.model.layers[1]]), tok)
    llm = tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(
        model, model.get_input_embeddings(), multiply_by_inputs=False), tok)
    inp = tkc.TextTokenInput(PROMPT, tok)
    with pytest.raises(TypeError, match="needs one tensor"):
        llm.attribute(inp, target=TARGET, n_steps=4, return_convergence_delta=True)


@pytest.mark.parametrize("layer", ["block", "norm"])
def test_one_target_token_after_mixing_with_skipped_tokens_equals_captum(layer, model, tok):
    """One target token: no continuation positions, so the one pass runs on a later layer too;
    its baseline activations (kept tokens included) come from the baseline prompt's forward."""
    pick = (lambda m: m.model.layers[0]) if layer == "block" else (lambda m: m.model.norm)
    results = []
    for mod in (ca, tkc):
        inp = mod.TextTokenInput(PROMPT, tok, skip_tokens=["<s>", "cat"])
        llm = mod.LLMGradientAttribution(mod.LayerIntegratedGradients(model, pick(model)), tok)
        results.append(llm.attribute(inp, target="dog", n_steps=8).token_attr)
    want, got = results
    scale = want.abs().max()
    assert scale > 1e-4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale + 1e-8)  # + f32 rounding
    from taylor_kernels.attr.generation import generation_attribution
    with pytest.raises(ValueError, match="not the input embeddings"):
        generation_attribution(model, torch.tensor([[1, 4, 5]]), torch.tensor([6]),
                               layer=pick(model), steps=4)  # zero baseline: embeddings only


def test_per_token_loop_progress_bar_counts_target_tokens(model, tok, capsys):
    llm = tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(
        model, model.get_input_embeddings(), multiply_by_inputs=False), tok)
    llm.attribute(tkc.TextTokenInput(PROMPT, tok), target=TARGET, n_steps=4, progress=True)
    err = capsys.readouterr().err
    assert "target tokens" in err and "3/3" in err


def test_bad_targets_raise_captums_exception_types(model, tok):
    """Out of the vocabulary: IndexError (Captum's embedding lookup); 0-d: TypeError (Captum
    iterates over it); both also our ValueError / TypeError with a message."""
    llm = tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(
        model, model.get_input_embeddings()), tok)
    inp = tkc.TextTokenInput(PROMPT, tok)
    with pytest.raises(IndexError, match="outside the embedding's vocabulary"):
        llm.attribute(inp, target=torch.tensor([len(tok) + 5]), n_steps=4)
    with pytest.raises(TypeError, match="0-d"):
        llm.attribute(inp, target=torch.tensor(3), n_steps=4)
    for bad, err in ((torch.tensor([len(tok) + 5]), IndexError), (torch.tensor(3), TypeError)):
        with pytest.raises(err):
            ca.LLMGradientAttribution(ca.LayerIntegratedGradients(
                model, model.get_input_embeddings()), tok).attribute(
                ca.TextTokenInput(PROMPT, tok), target=bad, n_steps=4)


def test_ids_outside_the_vocabulary_are_caught_for_a_later_layer(model, tok):
    """The attributed layer has no vocabulary of its own: the ids are checked against the
    model's input embeddings (before, a raw gather error from inside the LM head)."""
    import taylor_kernels as tk
    from taylor_kernels.attr.generation import generation_attribution
    block = model.model.layers[0]
    prompt = torch.tensor([[1, 4, 5]])
    with pytest.raises(IndexError, match="target_ids holds the id"):
        generation_attribution(model, prompt, torch.tensor([len(tok) + 3]), layer=block,
                               baselines=0, steps=4)
    with pytest.raises(IndexError, match="input_ids holds the id"):
        tk.token_integrated_gradients(model, torch.tensor([[1, len(tok) + 3]]), 4, layer=block,
                                      baselines=0, steps=4)
    with pytest.raises(IndexError, match="outside the embedding's vocabulary"):
        tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(model, block), tok).attribute(
            tkc.TextTokenInput(PROMPT, tok), target=torch.tensor([len(tok) + 3]), n_steps=4)


def test_result_setters_convert_and_check_shapes_as_captum(model, tok):
    """``seq_attr``, ``token_attr`` and ``output_probs`` took anything: a list stayed a list,
    wrong shapes were kept. As Captum's: array-likes become tensors, wrong shapes raise
    AssertionError (also our ValueError)."""
    llm = tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(
        model, model.get_input_embeddings()), tok)
    res = llm.attribute(tkc.TextTokenInput("the cat", tok), target="dog ran", n_steps=4)
    n_in, n_out = len(res.input_tokens), len(res.output_tokens)
    assert (n_in, n_out) == (3, 2) and res.token_attr.shape == (2, 3)
    res.seq_attr, res.token_attr, res.output_probs = [1.0, 2.0, 3.0], np.ones((2, 3)), [.1, .2]
    assert isinstance(res.seq_attr, torch.Tensor) and res.seq_attr.tolist() == [1.0, 2.0, 3.0]
    assert isinstance(res.token_attr, torch.Tensor) and res.token_attr.shape == (2, 3)
    assert isinstance(res.output_probs, torch.Tensor) and res.output_probs.shape == (2,)
    res.token_attr = res.output_probs = None
    assert res.token_attr is None and res.output_probs is None
    bad = [("seq_attr", torch.zeros(5)), ("seq_attr", torch.zeros(3, 1)),
           ("token_attr", torch.zeros(3, 3)), ("token_attr", [1.0, 2.0, 3.0]),
           ("output_probs", torch.zeros(3))]
    for name, value in bad:
        captums = ca.LLMAttributionResult(input_tokens=res.input_tokens,
                                          output_tokens=res.output_tokens,
                                          seq_attr=torch.zeros(n_in))
        with pytest.raises(AssertionError):
            setattr(captums, name, value)
        with pytest.raises(ValueError, match=name):
            setattr(res, name, value)
    with pytest.raises(AssertionError, match="seq_attr"):
        tkc.LLMAttributionResult(input_tokens=["a"], output_tokens=["b"], seq_attr=[1.0, 2.0])


def test_unknown_skip_token_strings_map_to_the_unknown_token_as_captum(model, tok):
    """Captum converts ``skip_tokens`` strings with ``convert_tokens_to_ids``: one the
    tokenizer does not know is its unknown-token id (the prompt's unknown words are skipped);
    ours raised ValueError. Now the same features and attributions, with a warning naming the
    string; a tokenizer without an unknown token skips nothing for it (as Captum's set of ids
    holding None). The library functions keep their error."""
    results = []
    for mod in (ca, tkc):
        with pytest.warns(UserWarning, match="'zzz'.*unknown token id 1") if mod is tkc \
                else contextlib.nullcontext():
            inp = mod.TextTokenInput("the zebra cat", tok, skip_tokens=["<s>", "zzz"])
        assert inp.values == ["the", "cat"]
        llm = mod.LLMGradientAttribution(mod.LayerIntegratedGradients(
            model, model.get_input_embeddings()), tok)
        results.append(llm.attribute(inp, target="dog", n_steps=8).token_attr)
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-6)

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "the", "cat"])}))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    no_unk = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>")
    assert no_unk.unk_token_id is None
    with pytest.warns(UserWarning, match="'zzz'.*no unknown token: skipping nothing"):
        values = tkc.TextTokenInput("the cat", no_unk, skip_tokens=["zzz", "cat"]).values
    assert values == ca.TextTokenInput("the cat", no_unk, skip_tokens=["zzz", "cat"]).values \
        == ["the"]
    from taylor_kernels.attr.generation import generation_attribution
    with pytest.raises(ValueError, match="no token 'zzz'"):
        generation_attribution(model, torch.tensor([[2, 4, 1]]), torch.tensor([6]), steps=2,
                               tokenizer=tok, skip_tokens=["zzz"])


def test_the_llm_class_has_captums_attribution_members(model, tok):
    """Captum's LLMGradientAttribution inherits has_convergence_delta / multiplies_by_inputs
    (both False) and names its SUPPORTED_INPUTS; ours lacked them."""
    import captum.attr as ca
    ours = tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(
        model, model.get_input_embeddings()), tok)
    theirs = ca.LLMGradientAttribution(ca.LayerIntegratedGradients(
        model, model.get_input_embeddings()), tok)
    assert ours.has_convergence_delta() is theirs.has_convergence_delta() is False
    assert ours.multiplies_by_inputs is theirs.multiplies_by_inputs is False
    assert [c.__name__ for c in ours.SUPPORTED_INPUTS] == \
        [c.__name__ for c in theirs.SUPPORTED_INPUTS]


def test_result_plots_draw_as_captums():
    """``plot_token_attr`` used a red-positive, blue-negative map (Captum's: red negative,
    white, green positive: a reader of Captum's plots saw every sign reversed), 2 decimals
    and smaller figures; ``plot_seq_attr`` other sizes and labels."""
    import matplotlib.pyplot as plt
    token_attr = torch.tensor([[1.0, -1.0, 0.123456], [0.5, 0.0, -0.25]])
    kw = dict(input_tokens=["a", "b\n", "c" * 80], output_tokens=["x", "y"],
              seq_attr=token_attr.sum(0), token_attr=token_attr)
    drawn = []
    for mod in (ca, tkc):
        fig, ax = mod.LLMAttributionResult(**kw).plot_token_attr()
        im = ax.images[0]
        seq_fig, seq_ax = mod.LLMAttributionResult(**kw).plot_seq_attr()
        drawn.append((tuple(fig.get_size_inches()), fig.axes[-1].get_ylabel(),
                      [t.get_text() for t in ax.texts], [t.get_color() for t in ax.texts],
                      [im.cmap(im.norm(v)) for v in (-1.0, 0.0, 0.3, 1.0)],
                      [t.get_text() for t in ax.get_xticklabels()],
                      tuple(seq_fig.get_size_inches()), seq_ax.get_ylabel(),
                      [p.get_facecolor() for p in seq_ax.patches],
                      [t.get_text() for t in seq_ax.get_xticklabels()]))
        plt.close(fig)
        plt.close(seq_fig)
    assert drawn[1] == drawn[0]
