"""The unification table and the fourteen methods, from a QA pass (2026-12-03): round-off
terms, an undefined P1, empty backgrounds, ``max_terms``, models the rules cannot read."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import taylor_kernels as tk
from taylor_kernels.attr.methods_gradient import smoothgrad
from taylor_kernels.attr.methods_perturbation import prediction_difference
from taylor_kernels.attr.methods_rules import deepshap
from taylor_kernels.attr.unification import allocation, polynomial_network


class Additive(nn.Module):
    """``f(x) = sum_i g(x_i)``: no interaction term at all."""

    def forward(self, x):
        return (0.7 * x + torch.tanh(1.3 * x) - 0.4 * x ** 3).sum(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_additive_model_has_no_interaction_to_score(dtype):
    """Round-off 'interaction terms' (|T| 3e-15 in float64, 1e-6 in float32) were probed:
    Occlusion-1 and Gradient x Input scored P3 = 2 on a model without interactions."""
    x = torch.tensor([[0.8, -1.1, 0.5, 1.3, -0.6]], dtype=dtype)
    table = tk.unification_table(Additive(), x, order=3, max_terms=8,
                                 methods=("occlusion_1", "gradient_x_input", "shapley_value"))
    assert table.terms_probed == 8  # single-feature terms only (x_i, x_i^2, x_i^3)
    for row in table.rows:
        assert math.isnan(row.p3) and math.isnan(row.inter_members), row
        assert row.p2 is not None and not math.isnan(row.p2)


def test_p1_is_undefined_where_f_x_equals_f_b():
    """An even model with b = -x: IG's 1e-17 gap read P1 = 7.5e283."""
    class Even(nn.Module):
        def forward(self, x):
            return (x ** 2 + 0.1 * x ** 4).sum(1)

    x = torch.tensor([[0.5, -1.0, 0.3]], dtype=torch.float64)
    table = tk.unification_table(Even(), x, -x, order=2, max_terms=4,
                                 methods=("gradient_x_input", "integrated_gradients"))
    assert all(math.isnan(r.p1) and "P1 n/a" in r.note for r in table.rows)
    assert "| integrated_gradients | n/a |" in table.markdown()
    moved = tk.unification_table(Even(), x, 0.5 * x, order=2, max_terms=4,
                                 methods=("gradient_x_input",))
    assert moved.rows[0].p1 > 0.01 and not moved.rows[0].note


@pytest.mark.parametrize("max_terms", [1, 3, 5, 6])
def test_max_terms_terms_are_probed(max_terms):
    """``max_terms=1`` probed 2 terms, an odd number one fewer than asked."""
    D = 4
    terms = [(1.0 + i, (i,)) for i in range(D)] + [(0.5 + i, (i, (i + 1) % D)) for i in range(D)]
    b = torch.zeros(1, D, dtype=torch.float64)
    net = polynomial_network(terms, b)
    x = torch.tensor([[0.9, -0.7, 1.2, 0.4]], dtype=torch.float64)
    table = tk.unification_table(net, x, b, 0, order=2, max_terms=max_terms,
                                 methods=("gradient_x_input",))
    assert table.terms_probed == max_terms


def test_an_empty_background_is_an_error():
    """prediction_difference and deepshap returned all-NaN attributions."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    empty = torch.empty(0, 4, dtype=torch.float64)
    for method in (prediction_difference, deepshap):
        with pytest.raises(ValueError, match=r"background must be a tensor \[R >= 1, \*\(4,\)\]"):
            method(model, x, empty, target=0)


def test_lrp_on_a_model_without_an_affine_layer_says_so():
    """A bare StopIteration came out of the LRP rules."""
    model = nn.Sequential(nn.Tanh(), nn.Softplus())
    with pytest.raises(ValueError, match="LRP needs a Linear or Conv layer"):
        tk.fourteen_methods(model, torch.randn(2, 3), target=0)


def test_smoothgrad_of_no_features_is_empty_like_the_other_methods():
    class Bias(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.tensor([0.3, -0.2]))

        def forward(self, x):
            return self.b + x.sum(1, keepdim=True)

    res = smoothgrad(Bias(), torch.empty(3, 0), target=1, samples=2, seed=0)
    assert res.attributions.shape == (3, 0)


def test_allocation_of_the_empty_term_names_kappa():
    x = torch.tensor([[0.5, 0.2]], dtype=torch.float64)
    with pytest.raises(ValueError, match="kappa must name at least one feature"):
        allocation("integrated_gradients", (), x, None)
