"""Hugging Face model adapters: outputs (ModelOutput/dict/tuple), token ids through the input
embeddings, per-row keyword arguments and padding, bf16, attention backends, mixed-type errors.
GPT-2, Llama and BERT (MiniLM-like) models are built from configs with random weights."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

import taylor_kernels as tk  # noqa: E402
from taylor_kernels.models import SelectOutput, hf, model_output, tiny  # noqa: E402
from tests.attr.test_low_precision import one_thread  # noqa: E402,F401  (autouse: 1 thread)

IDS = torch.tensor([[2, 17, 33, 8, 91, 40, 5]])


@pytest.fixture(scope="module")
def gpt2():
    return tiny.gpt2(layers=2, d=64)


@pytest.fixture(scope="module")
def llama():
    return tiny.llama(layers=2, d=64)


def _captum_lig(model, ids, base_ids, target, steps, mask=None, delta=False):
    from captum.attr import LayerIntegratedGradients

    def f(i, m=None):
        logits = model(input_ids=i, attention_mask=m).logits[:, -1].float()
        return torch.log_softmax(logits, -1)

    lig = LayerIntegratedGradients(f, model.get_input_embeddings())
    return lig.attribute(ids, base_ids, target=target, n_steps=steps,
                         additional_forward_args=None if mask is None else (mask,),
                         return_convergence_delta=delta)


# ---- outputs -------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.lin, self.kind = torch.nn.Linear(4, 3), kind

    def forward(self, x):
        y = self.lin(x)
        if self.kind == "dict":
            return {"hidden": y * 2, "logits": y}
        if self.kind == "tuple":
            return ("no tensor", y, y * 2)
        if self.kind == "modeloutput":
            from transformers.modeling_outputs import SequenceClassifierOutput
            return SequenceClassifierOutput(logits=y, hidden_states=(y * 2,))
        return object()


@pytest.mark.parametrize("kind", ["dict", "tuple", "modeloutput"])
def test_outputs_select_logits_by_rule(kind):
    torch.manual_seed(0)
    net = _Net(kind)
    x = torch.randn(3, 4)
    res = tk.integrated_gradients(net, x, target=1, steps=8)
    ref = tk.integrated_gradients(lambda v: net.lin(v), x, target=1, steps=8)
    torch.testing.assert_close(res.attributions, ref.attributions)


def test_outputs_named_and_errors():
    net = _Net("dict")
    x = torch.randn(2, 4)
    named = tk.integrated_gradients(SelectOutput(net, "hidden"), x, target=0, steps=4)
    ref = tk.integrated_gradients(lambda v: 2 * net.lin(v), x, target=0, steps=4)
    torch.testing.assert_close(named.attributions, ref.attributions)
    assert model_output((1, net.lin(x)), lambda o: o[1]).shape == (2, 3)
    with pytest.raises(ValueError, match=r"\.logits"):
        tk.integrated_gradients(_Net("object"), x, target=0)
    with pytest.raises(ValueError, match=r"\.logits"):
        model_output({"a": 1})
    with pytest.raises(ValueError, match="output='missing'"):
        model_output({"logits": x}, "missing")


# ---- token ids through the embedding layer -------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_token_ig_equals_captum_layer_ig(arch, request):
    model = request.getfixturevalue(arch)
    mask = torch.ones_like(IDS)
    res = hf.token_integrated_gradients(model, IDS, target=9, baselines="pad",
                                        attention_mask=mask, score="log_prob", steps=12)
    ref, delta = _captum_lig(model, IDS, torch.zeros_like(IDS), 9, 12, mask, delta=True)
    torch.testing.assert_close(res.attributions, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.token_scores, ref.sum(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.gap, delta, rtol=0, atol=1e-5)


def test_logits_computed_only_at_read_positions(gpt2):
    rows = []
    hook = gpt2.lm_head.register_forward_hook(lambda m, i, o: rows.append(tuple(o.shape)))
    try:
        hf.token_integrated_gradients(gpt2, IDS, target=3, steps=4)
    finally:
        hook.remove()
    assert rows and all(s[1] == 1 for s in rows), rows


def test_padding_and_mask_carried_per_row(llama):
    """Right-padded batch rows (attention_mask as keyword, carried per row) give each
    sentence's unpadded attributions; padding and kept tokens get exactly zero."""
    short = IDS[:, :4]
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0], ids[1, :4] = IDS[0], short[0]
    mask = (torch.arange(7) < torch.tensor([[7], [4]])).long()
    res = hf.token_integrated_gradients(llama, ids, target=torch.tensor([9, 11]),
                                        attention_mask=mask, skip_tokens=[2], steps=8,
                                        chunk_size=5)
    one = hf.token_integrated_gradients(llama, short, target=11, skip_tokens=[2], steps=8)
    torch.testing.assert_close(res.attributions[1, :4], one.attributions[0], rtol=0, atol=2e-6)
    assert (res.attributions[1, 4:] == 0).all() and (res.attributions[:, 0] == 0).all()
    full = hf.token_integrated_gradients(llama, IDS, target=9, skip_tokens=[2], steps=8)
    torch.testing.assert_close(res.attributions[0], full.attributions[0], rtol=0, atol=2e-6)


def test_gpt2_positional_mask_would_crash_but_keyword_works(gpt2):
    """GPT-2's second positional argument is the cache: the mask must go by keyword."""
    mask = torch.ones_like(IDS)
    with pytest.raises(Exception):
        gpt2(IDS, mask)
    res = hf.token_integrated_gradients(gpt2, IDS, target=1, attention_mask=mask, steps=4)
    assert torch.isfinite(res.attributions).all()


def test_bert_encoder_pooled_output_vs_captum():
    """A MiniLM-like BERT encoder with a mean-pooled score (output= callable)."""
    from captum.attr import LayerIntegratedGradients

    model = tiny.bert()
    mask = torch.ones_like(IDS)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(1))

    def pooled(out):
        return (out.last_hidden_state.mean(1) @ direction)[:, None]

    res = hf.token_integrated_gradients(model, IDS, target=0, attention_mask=mask,
                                        output=pooled, position=None, keep=IDS == 2, steps=8)
    base = torch.where(IDS == 2, IDS, 0)
    lig = LayerIntegratedGradients(lambda i, m: pooled(model(input_ids=i, attention_mask=m)),
                                   model.get_input_embeddings())
    ref = lig.attribute(IDS, base, target=0, additional_forward_args=(mask,), n_steps=8)
    torch.testing.assert_close(res.attributions, ref, rtol=0, atol=1e-6)


def test_bf16_float32_accumulation(llama):
    import copy

    low = copy.deepcopy(llama).to(torch.bfloat16)
    kw = dict(target=9, score="log_prob", baselines="pad", steps=8)
    r16 = hf.token_integrated_gradients(low, IDS, **kw)
    r32 = hf.token_integrated_gradients(llama, IDS, **kw)
    assert r16.attributions.dtype == torch.float32 and r16.gap.dtype == torch.float32
    rel = (r16.token_scores - r32.token_scores).norm() / r32.token_scores.norm()
    assert rel < 0.1, rel
    assert (r16.gap - r32.gap).abs().max() < 0.05 * r32.token_scores.abs().sum()


def test_fp16_second_order_through_layer_norm_is_finite(gpt2):
    """PyTorch's fp16 layer_norm double backward overflows near a zero baseline: every token
    interaction of a fp16 GPT-2 was NaN, silently. Second derivatives of low-precision points
    run the composite norms (float32 statistics): finite and near float32's of the same
    weights."""
    import copy

    low = copy.deepcopy(gpt2).to(torch.float16)
    same = copy.deepcopy(low).float()
    kw = dict(target=1, steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the math-attention notice)
        r16 = tk.token_interactions(low, IDS[:, :5], **kw)
        r32 = tk.token_interactions(same, IDS[:, :5], **kw)
    g16, g32 = r16["interactions"].float(), r32["interactions"]
    assert torch.isfinite(g16).all()
    assert (g16 - g32).norm() / g32.norm() < 0.05


def test_second_derivatives_that_overflow_raise():
    """A model whose own gradients are non-finite at finite points (sqrt of a zero norm) is
    refused with FloatingPointError, as first-order methods refuse NaN gradients."""
    x = torch.zeros(2, 3, dtype=torch.float64)
    x[1] = 1.0
    with pytest.raises(FloatingPointError, match="non-finite gradients or Hessian-vector"):
        tk.hvp(lambda z: (z * z).sum(1).sqrt(), x, torch.ones_like(x))


def test_named_layer_and_errors(gpt2):
    by_name = hf.token_integrated_gradients(gpt2, IDS, target=1, layer="transformer.wte",
                                            steps=4)
    default = hf.token_integrated_gradients(gpt2, IDS, target=1, steps=4)
    torch.testing.assert_close(by_name.attributions, default.attributions)
    with pytest.raises(TypeError, match="token ids"):
        hf.token_integrated_gradients(gpt2, IDS, target=1, baselines=torch.zeros(1, 7))
    with pytest.raises(TypeError, match="token ids"):
        hf.token_integrated_gradients(gpt2, IDS, target=1, baselines=0.5)
    with pytest.raises(TypeError, match="integer token ids"):
        hf.token_integrated_gradients(gpt2, IDS.float(), target=1)
    with pytest.raises(ValueError, match="unk_token_id"):
        hf.token_integrated_gradients(gpt2, IDS, target=1, baselines="unk")
    with pytest.raises(ValueError, match="get_input_embeddings"):
        hf.input_embeddings(torch.nn.Linear(2, 2))


def test_input_checks_name_the_argument(gpt2):
    """Ids outside the vocabulary, empty ids, badly shaped masks and a duplicated input_ids get
    a ValueError naming the argument (not an IndexError deep in torch)."""
    for kw, match in [({"input_ids": IDS + 500}, "input_ids holds the id 5"),
                      ({"baselines": -1}, "baselines holds the id -1"),
                      ({"input_ids": IDS[:, :0]}, "input_ids is empty"),
                      ({"keep": torch.ones(3, 7, dtype=torch.bool)}, "keep of shape"),
                      ({"model_kwargs": {"input_ids": IDS}}, "must not hold input_ids"),
                      ({"model_kwargs": {"logits_to_keep": 1}}, "must not hold logits_to_keep"),
                      ({"model_kwargs": {"labels": IDS}}, "must not hold labels"),
                      ({"model_kwargs": {"past_key_values": ()}}, "must not hold past_key"),
                      ({"attention_mask": torch.ones(1, 7), "model_kwargs": {
                          "attention_mask": torch.ones(1, 7)}}, "attention_mask given twice")]:
        kw = {"input_ids": IDS, **kw}
        with pytest.raises(ValueError, match=match):
            hf.token_integrated_gradients(gpt2, kw.pop("input_ids"), target=1, steps=2, **kw)


@pytest.mark.parametrize("api", ["token_integrated_gradients", "token_interactions"])
def test_captums_additional_forward_args_is_refused_naming_model_kwargs(gpt2, api):
    """The name clashed inside the token APIs ("got multiple values for keyword argument")."""
    with pytest.raises(TypeError, match="model_kwargs="):
        getattr(hf, api)(gpt2, IDS, target=1, steps=2, additional_forward_args=(IDS,))


@pytest.mark.parametrize("api", ["token_integrated_gradients", "token_interactions"])
def test_a_model_in_train_mode_is_refused_before_any_forward(api):
    """As generation attribution does: dropout would make every number random (token IG ran
    the model first, then refused it in the engine's check)."""
    model = tiny.gpt2(layers=1, d=32).train()
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    with pytest.raises(ValueError, match="Dropout"):
        getattr(hf, api)(model, IDS, target=1, steps=2)
    assert not forwards


def test_token_strings_to_skip_and_numpy_baseline_ids(gpt2):
    words = [f"w{i}" for i in range(124)]
    tok = tiny.word_tokenizer(words)
    ids = torch.tensor([[2, 17, 33, 8, 17]])
    by_id = hf.token_integrated_gradients(gpt2, ids, target=1, steps=4, baselines=1,
                                          skip_tokens=[tok.convert_tokens_to_ids("w13")])
    by_string = hf.token_integrated_gradients(gpt2, ids, target=1, steps=4, tokenizer=tok,
                                              baselines=np.int64(1), skip_tokens=["w13"])
    torch.testing.assert_close(by_string.attributions, by_id.attributions)
    assert float(by_id.token_scores[0, [1, 4]].abs().max()) == 0.0
    with pytest.raises(TypeError, match="pass tokenizer="):
        hf.token_integrated_gradients(gpt2, ids, target=1, steps=2, skip_tokens=["w13"])


def test_mask_in_model_kwargs_lists_and_numpy_positions_are_taken(gpt2):

    ids = torch.cat([IDS, IDS.flip(1)])
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    ref = hf.token_integrated_gradients(gpt2, ids, target=[1, 2], attention_mask=mask,
                                        keep=ids == 2, steps=8)
    got = hf.token_integrated_gradients(gpt2, ids, target=[1, 2], steps=8,
                                        model_kwargs={"attention_mask": mask.tolist()},
                                        keep=(ids == 2).tolist())
    torch.testing.assert_close(got.attributions, ref.attributions)
    assert float(got.token_scores[0, 5:].abs().max()) == 0.0  # padding held at its embedding
    at = hf.token_integrated_gradients(gpt2, IDS, target=1, position=np.int64(-2), steps=4)
    torch.testing.assert_close(at.attributions, hf.token_integrated_gradients(
        gpt2, IDS, target=1, position=-2, steps=4).attributions)


def test_gpt2_token_type_ids_embedded_by_the_same_layer(gpt2):
    """GPT-2 embeds token_type_ids with its word embeddings: the ids' embedding (the layer's
    first call) is attributed, the token types' runs unchanged (completeness holds)."""
    tti = torch.randint(0, 3, IDS.shape, generator=torch.Generator().manual_seed(0))
    res = hf.token_integrated_gradients(tiny.gpt2(layers=1, d=32, dtype=torch.float64), IDS,
                                        target=1, steps=64, model_kwargs={"token_type_ids": tti})
    assert float(res.gap.abs().max()) < 1e-6
    plain = hf.token_integrated_gradients(gpt2, IDS, target=1, steps=8)
    typed = hf.token_integrated_gradients(gpt2, IDS, target=1, steps=8,
                                          model_kwargs={"token_type_ids": tti})
    assert not torch.allclose(plain.attributions, typed.attributions)


def test_output_index_on_a_model_output(gpt2):
    torch.testing.assert_close(
        hf.token_integrated_gradients(gpt2, IDS, target=1, output=0, steps=4).attributions,
        hf.token_integrated_gradients(gpt2, IDS, target=1, steps=4).attributions)


def test_second_order_switches_to_math_attention_once(gpt2):
    """Token-pair Integrated Hessians through SDPA attention: one warning, and the same values
    as the eager-attention model."""
    eager = tiny.gpt2(layers=2, d=64, attn="eager")
    ids = IDS[:, :4]
    _forget_attention_warnings()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        a = hf.token_interactions(gpt2, ids, target=9, steps=4, ig_steps=8)
        hf.token_interactions(gpt2, ids, target=9, steps=4, ig_steps=8)
    msgs = [str(w.message) for w in seen if "second-order" in str(w.message)]
    assert len(msgs) == 1 and "math SDPA backend" in msgs[0], msgs
    b = hf.token_interactions(eager, ids, target=9, steps=4, ig_steps=8)
    torch.testing.assert_close(a["interactions"], b["interactions"], rtol=1e-4, atol=1e-6)
    assert a["interactions"].shape == (1, 4, 4)


def _forget_attention_warnings(about: str = "second-order attribution"):
    from taylor_kernels.engine import derivative
    for msg in [m for m in derivative._warned if about in m]:
        derivative._warned.discard(msg)


@pytest.mark.parametrize("api", ["integrated_hessians", "hessian", "interactions", "jet"])
def test_every_second_order_api_says_once_that_sdpa_runs_its_math_backend(api):
    """Through ``inputs_embeds`` (a closure over the model): the engine names the model once
    per class, as token_interactions does (only that one said so)."""
    model = tiny.llama(layers=1, d=32)
    x = model.get_input_embeddings()(IDS[:, :3]).detach()

    def f(e):
        return model(inputs_embeds=e).logits[:, -1, 5]

    calls = {"integrated_hessians": lambda: tk.integrated_hessians(f, x, steps=2),
             "hessian": lambda: tk.hessian(f, x),
             "interactions": lambda: tk.interactions(f, x, order=3, sets=[(0, 1, 2)]),
             "jet": lambda: tk.jet(f, x, torch.randn_like(x), 3)}
    _forget_attention_warnings()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        calls[api]()
        calls[api]()
    msgs = [str(w.message) for w in seen if "second-order attribution" in str(w.message)]
    assert len(msgs) == 1 and "Llama" in msgs[0] and "math SDPA" in msgs[0], msgs


def test_k_way_sets_of_a_silu_model_under_a_callers_no_grad():
    """Nested forward mode through SiLU needs grad mode on: under the caller's no_grad a
    third-order set of a Llama raised "forward AD with aten::silu_backward"."""
    model = tiny.llama(layers=1, d=32)
    x = model.get_input_embeddings()(IDS[:, :3]).detach()

    def f(e):
        return model(inputs_embeds=e).logits[:, -1, 5]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the math-attention note)
        want = tk.interactions(f, x, order=3, sets=[(0, 1, 2), (4, 4, 7)]).derivatives
        with torch.no_grad():
            got = tk.interactions(f, x, order=3, sets=[(0, 1, 2), (4, 4, 7)]).derivatives
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("api", ["hessian", "jet"])
def test_every_second_order_api_runs_flex_attention_as_eager_and_restores_it(api):
    """Flex attention has no second derivative (on the CPU no backward at all): only
    token_interactions switched it to eager; the engine's own calls raised."""
    flex, eager = (tiny.llama(layers=1, d=32, attn=attn) for attn in ("flex_attention", "eager"))
    x = eager.get_input_embeddings()(IDS[:, :3]).detach()

    def at(model):
        def f(e):
            return model(inputs_embeds=e).logits[:, -1, 5]
        return f

    calls = {"hessian": lambda f: tk.hessian(f, x),
             "jet": lambda f: tk.jet(f, x, torch.ones_like(x), 3)}
    _forget_attention_warnings()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = calls[api](at(flex))
    assert flex.config._attn_implementation == "flex_attention"
    msgs = [str(w.message) for w in seen if "second-order attribution" in str(w.message)]
    assert len(msgs) == 1 and "'flex_attention' runs on eager attention" in msgs[0], msgs
    torch.testing.assert_close(got, calls[api](at(eager)))


_GLOBAL_MODEL = None  # the model a module-level function reaches (no closure to follow)


def _through_global(e):
    return _GLOBAL_MODEL(inputs_embeds=e).logits[:, -1]


@pytest.mark.parametrize("api", ["ig", "layer_ig", "front_layer_ig", "front_per_token", "eg",
                                 "sig", "front_gradient_shap", "front_ig_unscaled",
                                 "gradient_x_input", "smoothgrad", "neuron_ig",
                                 "ig_through_a_global"])
def test_first_order_apis_run_flex_attention_as_eager_on_the_cpu(api):
    """Flex attention has no backward on the CPU: token IG and generation switched it to
    eager, but IG, layer IG (library and front) and the front's per-token loop raised torch's
    "FlexAttention does not support backward on CPU"; later EG, SIG, the front's GradientShap
    (its unscaled IG and neuron IG ran through IG already), gradient x input, SmoothGrad, and
    any call reaching the model only through a global (found by its first call now)."""
    import taylor_kernels.captum as tkc

    flex, eager = (tiny.llama(layers=1, d=32, attn=attn) for attn in ("flex_attention", "eager"))
    ids = IDS[:, :4]

    def run(model):
        global _GLOBAL_MODEL
        emb = model.get_input_embeddings()
        x = emb(ids).detach()
        g = lambda e: model(inputs_embeds=e).logits[:, -1]  # noqa: E731
        refs = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        if api == "ig":
            return tk.integrated_gradients(g, x, target=5, steps=4).attributions
        if api == "ig_through_a_global":
            _GLOBAL_MODEL = model
            try:
                return tk.integrated_gradients(_through_global, x, target=5,
                                               steps=4).attributions
            finally:
                _GLOBAL_MODEL = None
        if api == "eg":
            return tk.expected_gradients(g, x, refs, target=5, samples=4, seed=0).attributions
        if api == "sig":
            return tk.shapley_integrated_gradients(g, x, target=5, coalitions=2, steps=4,
                                                   seed=0).attributions
        if api == "front_gradient_shap":
            torch.manual_seed(0)
            np.random.seed(0)
            return tkc.GradientShap(g).attribute(x, baselines=refs, target=5, n_samples=3)
        if api == "front_ig_unscaled":
            return tkc.IntegratedGradients(g, multiply_by_inputs=False).attribute(
                x, target=5, n_steps=4)
        if api == "gradient_x_input":
            from taylor_kernels.attr.methods_gradient import gradient_x_input
            return gradient_x_input(g, x, target=5).attributions
        if api == "smoothgrad":
            from taylor_kernels.attr.methods_gradient import smoothgrad
            return smoothgrad(g, x, target=5, samples=2, seed=0).attributions
        if api == "neuron_ig":
            return tkc.NeuronIntegratedGradients(g, model.model.layers[0].mlp).attribute(
                x, neuron_selector=(1, 3), n_steps=4)
        f = lambda i: model(input_ids=i).logits[:, -1]  # noqa: E731
        if api == "layer_ig":
            return tk.layer_integrated_gradients(f, emb, ids, target=5, steps=4).attributions
        if api == "front_layer_ig":
            return tkc.LayerIntegratedGradients(f, emb).attribute(ids, target=5, n_steps=4)
        words = [f"w{i}" for i in range(124)]
        tok = tiny.word_tokenizer(words)
        llm = tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(
            model, emb, multiply_by_inputs=False), tok)  # (not one pass: the per-token loop)
        return llm.attribute(tkc.TextTokenInput("w5 w17 w42", tok), target="w9 w11",
                             n_steps=4).token_attr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = run(flex)
    assert flex.config._attn_implementation == "flex_attention"
    torch.testing.assert_close(got, run(eager), rtol=1e-5, atol=1e-6)


def test_token_interactions_measure_the_pair_cost_once(gpt2, monkeypatch):
    """The HVP pair cost is cached per embedding layer (the closure is new every call): it was
    probed on 8 rows again on every call, beyond the budget."""
    from taylor_kernels.engine import derivative
    probes = []
    real = derivative._probe_bytes
    monkeypatch.setattr(derivative, "_probe_bytes", lambda *a: probes.append(1) or real(*a))
    ids = IDS[:, :5]
    first = hf.token_interactions(gpt2, ids, target=9, steps=4, ig_steps=8, max_memory="256MB")
    n = len(probes)
    again = hf.token_interactions(gpt2, ids, target=9, steps=4, ig_steps=8, max_memory="256MB")
    assert n > 0 and len(probes) == n
    torch.testing.assert_close(again["interactions"], first["interactions"])


def test_layer_ig_rejects_float_baselines_for_ids(gpt2):
    emb = gpt2.get_input_embeddings()
    with pytest.raises(TypeError, match="integer ids"):
        tk.layer_integrated_gradients(lambda i: gpt2(i).logits[:, -1], emb, IDS,
                                      torch.zeros(1, 7), target=1)


def test_first_order_attention_on_cpu_bf16_uses_the_math_backend(llama):
    """Token IG of a bf16 SDPA model on the CPU runs the path points' attention on the math
    backend (its backward is faster there); a float32 model keeps the fused kernels; the
    flags come back."""
    import copy

    low = copy.deepcopy(llama).to(torch.bfloat16)
    assert hf.attention_implementation(llama) == "sdpa"
    before = torch.backends.cuda.flash_sdp_enabled()
    for model, fused in ((low, False), (llama, before)):
        seen = []  # the flash flag at every forward that builds a graph (path points)
        hook = model.get_input_embeddings().register_forward_hook(
            lambda *a: seen.append(torch.backends.cuda.flash_sdp_enabled())
            if torch.is_grad_enabled() else None)
        hf.token_integrated_gradients(model, IDS, target=9, steps=4)
        hook.remove()
        assert seen and set(seen) == {fused}, seen
        assert torch.backends.cuda.flash_sdp_enabled() == before


def test_encoder_decoder_reads_the_decoders_last_position():
    """T5/BART: the logits are the decoder's, so ``position="last"`` is the decoder's last
    position (an encoder-padded row was read at its encoder length before), equal to Captum."""
    from captum.attr import LayerIntegratedGradients
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=64, pad_token_id=0, bos_token_id=2, eos_token_id=3, encoder_layers=1,
        decoder_layers=1, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)).eval()
    ids = torch.tensor([[5, 9, 17, 33, 41, 60, 7], [13, 21, 44, 8, 0, 0, 0]])
    mask, dec = (ids != 0).long(), torch.arange(10, 18).expand(2, 8)
    layer = model.model.encoder.embed_tokens
    res = hf.token_integrated_gradients(model, ids, target=5, attention_mask=mask, layer=layer,
                                        baselines=torch.zeros_like(ids), steps=16,
                                        model_kwargs={"decoder_input_ids": dec})
    lig = LayerIntegratedGradients(
        lambda i, m, d: model(input_ids=i, attention_mask=m, decoder_input_ids=d).logits[:, -1],
        layer)
    ref = lig.attribute(ids, torch.zeros_like(ids), target=5, additional_forward_args=(mask, dec),
                        n_steps=16)
    torch.testing.assert_close(res.attributions, ref, rtol=0, atol=1e-5 * ref.abs().max())
    with pytest.raises(ValueError, match="decoder_input_ids"):
        hf.token_integrated_gradients(model, ids, target=5, attention_mask=mask, layer=layer,
                                      steps=4)
    with pytest.raises(ValueError, match="never called.*encoder.embed_tokens"):
        hf.token_integrated_gradients(model, ids, target=5, attention_mask=mask, steps=4,
                                      model_kwargs={"decoder_input_ids": dec})


def test_a_float64_model_keeps_float64_scores():
    """Scores were cast to float32 for every dtype: a float64 GPT-2's log-prob gap was 1e-7
    where layer IG's was 3e-16 (and the adaptive rule's tolerance could not be met)."""
    model = tiny.gpt2(layers=1, d=32).double()
    res = tk.token_integrated_gradients(model, IDS, target=9, score="log_prob", steps=64)
    assert res.attributions.dtype == torch.float64
    assert float(res.gap.abs().max()) < 1e-12


def test_a_users_cache_is_refused_before_it_can_grow(gpt2):
    """past_key_values raised a torch shape error after the probe forward had appended to the
    caller's cache (4 tokens became 7)."""
    from transformers import DynamicCache
    with torch.no_grad():
        cache = gpt2(IDS[:, :4], use_cache=True, past_key_values=DynamicCache()).past_key_values
    before = cache.get_seq_length()
    with pytest.raises(ValueError, match="must not hold past_key_values"):
        tk.token_integrated_gradients(gpt2, IDS[:, 4:], target=1, steps=2,
                                      model_kwargs={"past_key_values": cache})
    assert cache.get_seq_length() == before


def test_flex_attention_runs_eager_for_first_order_on_the_cpu():
    """Flex attention has no backward on the CPU: torch's error told the user to stop
    requiring grad. The call runs eager attention (said once) and sets flex back."""
    model = tiny.llama(layers=1, d=32)
    want = tk.token_integrated_gradients(model, IDS, target=3, baselines="pad", steps=8)
    model.set_attn_implementation("flex_attention")
    _forget_attention_warnings("flex attention")  # (said once per process)
    try:
        with pytest.warns(RuntimeWarning, match="flex attention has no backward on the CPU"):
            got = tk.token_integrated_gradients(model, IDS, target=3, baselines="pad", steps=8)
        assert model.config._attn_implementation == "flex_attention"
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got.attributions, want.attributions, rtol=1e-5, atol=1e-6)


def test_an_output_callable_closing_over_the_batch_is_named():
    """``output=`` a mean pooling over the caller's ``[B, L]`` mask fails on a batch of path
    points: the error names the callable and why (torch's size mismatch came bare)."""
    model = tiny.bert()
    ids = torch.cat([IDS, IDS.flip(1)])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])

    def pool(out):
        h, m = out.last_hidden_state, mask[..., None].to(out.last_hidden_state.dtype)
        return (h * m).sum(1) / m.sum(1)
    with pytest.raises(ValueError, match="output='pool' failed .* row by row"):
        hf.token_integrated_gradients(model, ids, target=3, attention_mask=mask, output=pool,
                                      position=None, steps=4)


def test_an_int_position_on_padding_warns(gpt2):
    """An int ``position`` that is padding in some row scores a pad position's logit there
    (all zeros where padding leads): a warning names the rows; ``"last"`` is silent."""
    ids = torch.cat([IDS, IDS])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with pytest.warns(UserWarning, match=r"position=-1 reads padding \(attention_mask 0\) at row 1: index 6"):
        hf.token_integrated_gradients(gpt2, ids, target=1, attention_mask=mask, position=-1,
                                      steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        hf.token_integrated_gradients(gpt2, ids, target=1, attention_mask=mask, steps=4)


@pytest.mark.parametrize("form", ["tensor", "list", "numpy"])
def test_per_row_positions_equal_one_call_per_row(gpt2, form):
    """``position=`` one int per row reads each row at its own position: the batch equals
    separate one-row calls at those positions (negative counting from the end), for token IG
    and token interactions; the head runs only at the distinct positions read."""
    ids = torch.cat([IDS, IDS.flip(1), IDS.roll(2, 1)])
    rows = [2, -1, 4]
    position = {"tensor": torch.tensor(rows), "list": rows, "numpy": np.array(rows)}[form]
    res = hf.token_integrated_gradients(gpt2, ids, target=[5, 9, 11], position=position,
                                        steps=8)
    for r, (p, t) in enumerate(zip(rows, [5, 9, 11])):
        one = hf.token_integrated_gradients(gpt2, ids[r:r + 1], target=t, position=p, steps=8)
        torch.testing.assert_close(res.attributions[r], one.attributions[0])
        assert not torch.equal(one.attributions[0], hf.token_integrated_gradients(
            gpt2, ids[r:r + 1], target=t, position=(p + 1) % 7, steps=8).attributions[0])
    pair = hf.token_interactions(gpt2, ids[:2], target=[5, 9], position=position[:2],
                                 steps=4)
    one = hf.token_interactions(gpt2, ids[1:2], target=9, position=-1, steps=4)
    torch.testing.assert_close(pair["interactions"][1], one["interactions"][0])


def test_per_row_positions_are_checked(gpt2):
    ids = torch.cat([IDS, IDS])
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        hf.token_integrated_gradients(gpt2, ids, target=1, position=[1, 2, 3], steps=4)
    with pytest.raises(ValueError, match=r"lie in \[-7, 7\)"):
        hf.token_integrated_gradients(gpt2, ids, target=1, position=[1, 7], steps=4)
    with pytest.raises(TypeError, match="must be integers"):
        hf.token_integrated_gradients(gpt2, ids, target=1, position=torch.tensor([1., 2.]),
                                      steps=4)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with pytest.warns(UserWarning, match=r"position=per row reads padding .* row 1: index 5"):
        hf.token_integrated_gradients(gpt2, ids, target=1, attention_mask=mask,
                                      position=[6, 5], steps=4)
