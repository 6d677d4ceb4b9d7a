"""Session 23 fixes of the Captum front and the layer paths, each against Captum 0.9:
generation attribution of a model that is not causal (Captum's own test model), the message
for a layer whose (last) call's output does not reach the model output, layer methods
constructed with ``layer=None`` (Captum's TCAV sets ``.layer`` later), the dtype and numbers
of IG / neuron IG for bf16/fp16 inputs that require grad, and ``gap=False`` for
``tk.layer_integrated_gradients``."""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ca = pytest.importorskip("captum.attr")

import taylor_kernels as tk  # noqa: E402
import taylor_kernels.captum as tkc  # noqa: E402
from taylor_kernels.attr.layer_paths import multi_layer_integrated_gradients  # noqa: E402
from tests.attr.test_low_precision import one_thread  # noqa: E402,F401  (autouse: 1 thread)


class _Output(NamedTuple):
    logits: torch.Tensor


class Bidirectional(nn.Module):
    """Captum's ``DummyLLM`` of its LLM tests, reduced: an embedding, one
    ``TransformerEncoderLayer`` without a causal mask (every position sees every token) and
    a head; called as ``model(input_ids)``, returning ``.logits [N, L, V]``."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, 10)
        self.trans = nn.TransformerEncoderLayer(d_model=10, nhead=2, dim_feedforward=16,
                                                batch_first=True)
        self.linear = nn.Linear(10, vocab)

    def forward(self, input_ids, *args, **kwargs):
        return _Output(self.linear(self.trans(self.emb(input_ids))))


@pytest.fixture(scope="module")
def bidirectional():
    pytest.importorskip("transformers")
    from taylor_kernels.models import tiny
    tok = tiny.word_tokenizer("a b c m n o".split())
    torch.manual_seed(0)
    return Bidirectional(len(tok)).eval(), tok


def _llm_token_attr(mod, model, tok):
    llm = mod.LLMGradientAttribution(mod.LayerIntegratedGradients(model, model.emb), tok)
    return llm, llm.attribute(mod.TextTokenInput("a b c", tok), "m n o", n_steps=10).token_attr


def test_llm_attribution_of_a_bidirectional_model_runs_captums_loop(bidirectional):
    """The one pass needs a causal LM; for one that is not (Captum's own test model) the
    front and patch() raised "generation attribution needs a causal LM" where Captum scores
    each target on its own prefix: now the per-token loop runs, with Captum's numbers."""
    model, tok = bidirectional
    _, want = _llm_token_attr(ca, model, tok)
    llm, got = _llm_token_attr(tkc, model, tok)
    assert llm.last_result is None  # (the loop ran)
    with tkc.patched():
        _, patched = _llm_token_attr(ca, model, tok)
    scale = want.abs().max()
    assert want.shape == (3, 4) and scale > 1e-3
    for out in (got, patched):
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5 * scale)


_NET = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _side_call(z):
    """``_NET[0]`` runs twice; its second call's output is discarded."""
    out = _NET(z)
    _NET[0](2 * z)
    return out


def _unused_layer(z):
    """``_NET[0]`` runs but feeds nothing (Captum's ``relu_alt`` in its layer tests)."""
    _NET[0](z)
    return _NET[2](torch.tanh(z @ torch.ones(4, 6)))


_METHODS = {
    "LayerConductance": lambda f, x: tkc.LayerConductance(f, _NET[0]).attribute(
        x, target=1, n_steps=5),
    "InternalInfluence": lambda f, x: tkc.InternalInfluence(f, _NET[0]).attribute(
        x, target=1, n_steps=5),
    "LayerGradientShap": lambda f, x: tkc.LayerGradientShap(f, _NET[0]).attribute(
        x, torch.zeros(2, 4), target=1, n_samples=2),
    "NeuronConductance": lambda f, x: tkc.NeuronConductance(f, _NET[0]).attribute(
        x, 1, target=1, n_steps=5),
    "LayerIntegratedGradients": lambda f, x: tkc.LayerIntegratedGradients(f, _NET[0]).attribute(
        x, target=1, n_steps=5),
    "tk.layer_integrated_gradients": lambda f, x: tk.layer_integrated_gradients(
        f, _NET[0], x, target=1, steps=5),
}
_LAST_CALL = r"layer Linear: its last call's output \(of 2 calls per forward\) does not reach " \
    "the model output"
_UNUSED = "layer Linear: its output does not reach the model output"


@pytest.mark.parametrize("case", [(name, _side_call, _LAST_CALL) for name in _METHODS
                                  if "ntegrated" not in name]  # (LIG replaces every call)
                         + [(name, _unused_layer, _UNUSED) for name in _METHODS])
def test_a_layer_whose_output_is_unused_is_named(case):
    """The layer methods said "the model output does not depend on the inputs", which is
    false (it does), and NeuronConductance leaked torch's bare "appears to not have been used
    in the graph": both name the layer and its call now. The front's error is also a
    ``RuntimeError``, as Captum's (autograd's)."""
    name, f, message = case
    x = torch.randn(3, 4)
    error = ValueError if name.startswith("tk.") else RuntimeError
    with pytest.raises(error, match=message):
        _METHODS[name](f, x)


_LAYER_METHODS = {"LayerConductance": dict(n_steps=5), "InternalInfluence": dict(n_steps=5),
                  "LayerGradientShap": dict(baselines=torch.zeros(2, 4), n_samples=2,
                                            stdevs=0.1)}


@pytest.mark.parametrize("name", list(_LAYER_METHODS))
def test_layer_none_at_construction_then_assigned_as_captum(name):
    """``cls(model, None)`` and a later ``inst.layer = module`` (Captum's TCAV) raised
    TypeError at construction; now it gives Captum's numbers, and ``attribute`` before the
    layer is set says what to do."""
    x = torch.randn(3, 4)
    got = []
    for mod in (ca, tkc):
        inst = getattr(mod, name)(_NET, None)
        inst.layer = _NET[0]
        torch.manual_seed(1)
        np.random.seed(1)
        got.append(inst.attribute(x, target=1, **_LAYER_METHODS[name]))
    torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=f"{name} has no layer .*inst.layer = module"):
        getattr(tkc, name)(_NET, None).attribute(x, target=1, **_LAYER_METHODS[name])
    with pytest.raises(TypeError, match="layer must be a torch.nn.Module, got int"):
        getattr(tkc, name)(_NET, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", ["IntegratedGradients", "NeuronIntegratedGradients"])
@pytest.mark.parametrize("multiply", [True, False])
def test_half_inputs_requiring_grad_give_captums_float32(dtype, cls, multiply):
    """bf16/fp16 inputs that require grad gave bf16/fp16 attributions (Captum: float32),
    2.5e-3 off; without the (x - b) factor the path rounded its nodes to bf16 first (4.5e-4
    off, also without grad). Now float32 and Captum's numbers within 1e-6."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval().to(dtype)
    x = torch.randn(2, 6).to(dtype)
    args = dict(target=1) if cls == "IntegratedGradients" else dict(neuron_selector=2)
    make = (lambda mod: getattr(mod, cls)(m, multiply_by_inputs=multiply)) \
        if cls == "IntegratedGradients" else \
        (lambda mod: getattr(mod, cls)(m, m[1], multiply_by_inputs=multiply))
    want, got = (make(mod).attribute(x.clone().requires_grad_(), n_steps=20, **args)
                 for mod in (ca, tkc))
    assert got.dtype == want.dtype == torch.float32
    assert got.requires_grad == want.requires_grad
    err = (got.detach().double() - want.detach().double()).abs().max()
    assert err <= 1e-6 * want.detach().double().abs().max()


def test_layer_integrated_gradients_takes_gap_false():
    """``gap=False`` (as ``tk.integrated_gradients``'s) raised "unexpected keyword argument
    'gap'": now the gap is NaN, the attributions unchanged; the adaptive rule, which stops on
    the gap, still has it; so does the multi-layer path."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    full = tk.layer_integrated_gradients(m, m[0], x, target=1, steps=8)
    bare = tk.layer_integrated_gradients(m, m[0], x, target=1, steps=8, gap=False)
    torch.testing.assert_close(bare.attributions, full.attributions, rtol=1e-12, atol=1e-14)
    assert full.gap.isfinite().all() and bare.gap.isnan().all()
    adaptive = tk.layer_integrated_gradients(m, m[0], x, target=1, rule="adaptive", gap=False)
    assert adaptive.gap.isfinite().all()
    multi = multi_layer_integrated_gradients(m, [m[0]], x, target=1, steps=8, gap=False)
    torch.testing.assert_close(multi.attributions[0], full.attributions, rtol=1e-12,
                               atol=1e-14)
    assert multi.gap.isnan().all()
