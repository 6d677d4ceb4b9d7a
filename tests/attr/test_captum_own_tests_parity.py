"""Parity found by running Captum's own unit tests against the front (21 tests passing on
Captum 0.9.0 failed on ours): neuron selectors that return a batch sum or ``[N, 1]``, the
exception types of bad targets and of ``compute_convergence_delta``, a tokenizer whose
``decode`` takes only tensors, and our ``TextTokenInput`` in Captum's own ``LLMAttribution``."""
from __future__ import annotations

import pytest
import torch
from captum import attr as ca

import taylor_kernels as tk
import taylor_kernels.captum as tc
from taylor_kernels.models import tiny

F64 = torch.float64


class _ThreeLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 4).double()
        self.relu = torch.nn.ReLU()
        self.head = torch.nn.Linear(4, 2).double()

    def forward(self, x, multidim=False):
        out = self.head(self.relu(self.linear(x)))
        return out[:, :, None, None].expand(-1, -1, 2, 2) if multidim else out


BATCH_SUM, COLUMN = (lambda a: a[:, 1:].sum()), (lambda a: a[:, 1:2])


@pytest.mark.parametrize("cls, selector", [("NeuronIntegratedGradients", BATCH_SUM),
                                           ("NeuronIntegratedGradients", COLUMN),
                                           ("NeuronConductance", COLUMN)])
def test_neuron_selectors_returning_a_batch_sum_or_a_column(cls, selector):
    """Captum takes a selector summing over the whole batch (its test
    ``test_simple_ig_input_relu_selector_fn``; Captum's own NeuronConductance fails on one) or
    returning ``[N, 1]``; ours wanted ``[N]``."""
    model = _ThreeLayers()
    x = torch.randn(3, 3, dtype=F64)
    extra = {"target": 1} if cls == "NeuronConductance" else {}
    ours = getattr(tc, cls)(model, model.relu).attribute(x, selector, n_steps=16, **extra)
    theirs = getattr(ca, cls)(model, model.relu).attribute(x, selector, n_steps=16, **extra)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("cls", ["IntegratedGradients", "GradientShap", "LayerConductance"])
def test_bad_targets_raise_captums_exception_types(cls):
    """A tuple target with the wrong number of indices is Captum's ``AssertionError``, an
    out-of-range tensor target its ``RuntimeError`` (both were our IndexError)."""
    model = _ThreeLayers()
    x = torch.randn(2, 3, dtype=F64)
    make = {"LayerConductance": lambda m: tc.LayerConductance(m, m.linear)}.get(
        cls, lambda m: getattr(tc, cls)(m))
    kw = {"baselines": torch.zeros(3, 3, dtype=F64)} if cls == "GradientShap" else {}
    for target, extra in (((9999,) * 20, {}), ((1, 0), {"additional_forward_args": (True,)})):
        with pytest.raises(AssertionError, match="indices"):
            make(model).attribute(x, target=target, **kw, **extra)
    with pytest.raises(RuntimeError, match="out of range"):
        make(model).attribute(x, target=torch.tensor([0, 7]), **kw)


def test_compute_convergence_delta_raises_captums_assertion_error():
    model = _ThreeLayers()
    x = torch.randn(2, 3, dtype=F64)
    ig = tc.IntegratedGradients(model)
    attr = ig.attribute(x, target=0, n_steps=4)
    with pytest.raises(AssertionError, match="must match"):
        ig.compute_convergence_delta(attr, torch.zeros(3, 3, dtype=F64),
                                     torch.randn(3, 3, dtype=F64), target=0)


class _TensorDecode:
    """A word tokenizer whose ``decode`` takes a tensor only (Captum's protocol)."""

    def __init__(self, words):
        self.inner = tiny.word_tokenizer(words)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def decode(self, ids):
        return self.inner.decode(ids.tolist())


def test_llm_gradient_attribution_decodes_tensors():
    words = "a b c d e f g".split()
    tok = _TensorDecode(words)
    torch.manual_seed(0)
    model = tiny.llama(layers=1, d=16, vocab=len(tok.inner))
    llm = tc.LLMGradientAttribution(tc.LayerIntegratedGradients(model,
                                                                model.get_input_embeddings()),
                                    tok)
    res = llm.attribute(tc.TextTokenInput("a b c", tok), target="d e", n_steps=4)
    assert res.output_tokens == ["d", "e"] and res.token_attr.shape[0] == 2


def test_our_text_token_input_runs_in_captums_llm_attribution():
    """A whole ``from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput``
    line switched: Captum's LLMAttribution (ours is Captum's class) refused our input."""
    words = "a b c d e f g".split()
    tok = tiny.word_tokenizer(words)
    torch.manual_seed(0)
    model = tiny.llama(layers=1, d=16, vocab=len(tok))
    runs = []
    for mod in (ca, tc):
        llm = mod.LLMAttribution(mod.FeatureAblation(model), tok)
        runs.append(llm.attribute(mod.TextTokenInput("a b c", tok), "d e",
                                  use_cached_outputs=False).seq_attr)
    torch.testing.assert_close(runs[1], runs[0])


def test_an_input_made_before_captum_is_imported_is_captums_too():
    """The first TextTokenInput imports Captum (when installed) and registers with its ABC: an
    input made before ``from captum.attr import LLMAttribution`` was refused by it."""
    import subprocess
    import sys
    code = ("import torch, taylor_kernels.captum as tc\n"
            "from taylor_kernels.models import tiny\n"
            "tok = tiny.word_tokenizer('a b c d e'.split())\n"
            "inp = tc.TextTokenInput('a b', tok)\n"
            "from captum.attr import TextTokenInput\n"
            "assert isinstance(inp, TextTokenInput)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("name", ["IntegratedGradients", "LayerIntegratedGradients",
                                  "GradientShap", "LayerGradientShap", "NeuronConductance"])
def test_patched_attribute_wrapped_keeps_captums_signature(name):
    """Captum's test_input_layer_wrapper reads ``getfullargspec(attribute.__wrapped__)`` to
    decide whether to pass baselines: under patch() it showed ``(self, *args, **kwargs)``."""
    import inspect
    want = inspect.getfullargspec(getattr(ca, name).attribute.__wrapped__).args
    with tc.patched():
        got = inspect.getfullargspec(getattr(ca, name).attribute.__wrapped__).args
    assert got == want


@pytest.mark.parametrize("cls", ["IntegratedGradients", "LayerConductance"])
def test_a_step_count_that_is_not_whole_is_captums_type_error(cls):
    model = _ThreeLayers()
    x = torch.randn(2, 3, dtype=F64)
    method = tc.IntegratedGradients(model) if cls == "IntegratedGradients" else \
        tc.LayerConductance(model, model.linear)
    with pytest.raises(TypeError, match="integer"):
        method.attribute(x, target=0, n_steps=2.5)
    with pytest.raises(ValueError, match="integer"):  # ours: also the ValueError of a bad value
        tk.integrated_gradients(model, x, target=0, steps=2.5)
