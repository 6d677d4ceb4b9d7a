"""Layer IG where an additional forward argument acts *before* the attributed layer.

``f(ids, shift) = out(tanh(lin(emb(ids).flatten(1) + shift)))`` attributed to ``lin``: both the
input activation and the baseline activation of ``lin`` depend on ``shift``, and the network
after ``lin`` is nonlinear, so a front that builds the baseline activation without
``additional_forward_args`` (or drops them anywhere on the path) moves the path and changes the
result, for ``multiply_by_inputs`` True and False alike. Compared against Captum itself.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

captum_attr = pytest.importorskip("captum.attr")

import taylor_kernels as tk  # noqa: E402
from taylor_kernels.captum import LayerIntegratedGradients  # noqa: E402

VOCAB, LENGTH, DIM, CLASSES = 11, 5, 4, 3


class ShiftBeforeLayer(nn.Module):
    """Token ids -> embeddings -> (+ shift) -> lin (attributed) -> tanh -> out."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.lin = nn.Linear(LENGTH * DIM, 6)
        self.out = nn.Linear(6, CLASSES)

    def forward(self, ids, shift=None):  # a default, so a front that drops it fails silently
        h = self.emb(ids).flatten(1)
        return self.out(torch.tanh(self.lin(h if shift is None else h + shift)))


def _case():
    torch.manual_seed(3)
    model = ShiftBeforeLayer().double().eval()
    ids = torch.randint(1, VOCAB, (4, LENGTH))
    baseline_ids = torch.zeros_like(ids)
    shift = 2.0 * torch.randn(4, LENGTH * DIM, dtype=torch.float64)
    return model, ids, baseline_ids, shift


@pytest.mark.parametrize("multiply_by_inputs", [True, False])
@pytest.mark.parametrize("to_layer_input", [False, True], ids=["layer_out", "layer_in"])
def test_matches_captum_with_forward_arg_before_layer(multiply_by_inputs, to_layer_input):
    model, ids, baseline_ids, shift = _case()
    target = torch.tensor([0, 2, 1, 2])
    kw = dict(baselines=baseline_ids, target=target, additional_forward_args=(shift,),
              n_steps=24, attribute_to_layer_input=to_layer_input)
    want = captum_attr.LayerIntegratedGradients(
        model, model.lin, multiply_by_inputs=multiply_by_inputs).attribute(ids, **kw)
    got = LayerIntegratedGradients(
        model, model.lin, multiply_by_inputs=multiply_by_inputs).attribute(ids, **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)  # Captum rounds nodes


def test_shift_matters_here():
    """Guard against a vacuous test: without the shift the attributions really differ."""
    model, ids, baseline_ids, shift = _case()
    kw = dict(baselines=baseline_ids, target=1, n_steps=24)
    lig = captum_attr.LayerIntegratedGradients(model, model.lin, multiply_by_inputs=False)
    with_shift = lig.attribute(ids, additional_forward_args=(shift,), **kw)
    without = lig.attribute(ids, additional_forward_args=(torch.zeros_like(shift),), **kw)
    assert (with_shift - without).abs().max() > 1e-3


def test_functional_layer_ig_completeness_with_forward_arg_before_layer():
    model, ids, baseline_ids, shift = _case()
    res = tk.layer_integrated_gradients(model, model.lin, ids, baseline_ids, target=2,
                                        additional_forward_args=(shift,), steps=64)
    with torch.no_grad():
        delta = model(ids, shift)[:, 2] - model(baseline_ids, shift)[:, 2]
    torch.testing.assert_close(res.attributions.flatten(1).sum(1), delta, rtol=1e-6, atol=1e-8)
