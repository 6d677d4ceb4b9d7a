"""Integrated Gradients against Captum's IntegratedGradients (same model, baseline, rule, steps)."""
from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients

import taylor_kernels as tk
from tests import models
from tests.conftest import error_ratio

RULES = ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
         "gausslegendre"]


def relative_max(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_matches_captum(rule, kind, cpu_backend):
    if kind == "mlp":
        model, x = models.mlp(d_out=4), torch.randn(5, 10, dtype=torch.float64)
    else:
        model, x = models.cnn(), torch.randn(3, 2, 8, 8, dtype=torch.float64)
    baseline = 0.1 * torch.randn_like(x)
    target = [0, 2, 1, 3, 0][: x.shape[0]]
    ours = tk.integrated_gradients(model, x, baseline, target=target, steps=13, rule=rule,
                                   chunk_size=11)
    ref, delta = IntegratedGradients(model).attribute(
        x, baseline, target=target, n_steps=13, method=rule, return_convergence_delta=True)
    assert relative_max(ours.attributions, ref) < 1e-5
    torch.testing.assert_close(ours.gap, delta, rtol=1e-5, atol=1e-7)
    assert ours.evaluations == 13 * x.shape[0]


def test_matches_captum_float32_cnn():
    model, x = models.cnn(dtype=torch.float32), torch.randn(4, 2, 8, 8)
    ours = tk.integrated_gradients(model, x, target=1, steps=20)
    ref = IntegratedGradients(model).attribute(x, target=1, n_steps=20)
    assert ours.attributions.dtype == torch.float32
    assert error_ratio(ours.attributions, ref) < 1e-5


def test_tuple_inputs_and_forward_args_match_captum():
    model = models.two_input_model()
    a, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    scale = torch.rand(4, 1, dtype=torch.float64) + 0.5
    bases = (0.2, torch.randn(1, 2, 3, dtype=torch.float64))
    ours = tk.integrated_gradients(model, (a, b), bases, target=torch.tensor([0, 1, 2, 3]),
                                   additional_forward_args=(scale, False), steps=9, chunk_size=5)
    ref = IntegratedGradients(model).attribute(
        (a, b), bases, target=torch.tensor([0, 1, 2, 3]),
        additional_forward_args=(scale, False), n_steps=9)
    assert isinstance(ours.attributions, tuple) and len(ours.attributions) == 2
    for o, r in zip(ours.attributions, ref):
        assert o.shape == r.shape and relative_max(o, r) < 1e-5


def test_without_a_delta_no_forward_of_the_inputs_and_baselines_runs():
    """Captum's IG runs only the path when no delta is asked for; so do we (the endpoint
    forward, 2B rows, went unused), with the same attributions; ``gap=False`` in the library
    API, except for the rules that need the gap."""
    import math

    import taylor_kernels as tk
    import taylor_kernels.captum as tkc
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, a: rows.append(a[0].shape[0]) if not torch.is_grad_enabled() else None)
    try:
        ig = tkc.IntegratedGradients(model)
        plain = ig.attribute(x, target=1, n_steps=8)
        assert 6 not in rows and math.isnan(float(ig.last_result.gap[0]))  # no [x; b] batch
        rows.clear()
        with_delta, delta = ig.attribute(x, target=1, n_steps=8, return_convergence_delta=True)
        assert 6 in rows and delta.abs().max() < 1e-3
    finally:
        hook.remove()
    torch.testing.assert_close(plain, with_delta)
    fixed = tk.integrated_gradients(model, x, target=1, steps=8, gap=False)
    assert torch.isnan(fixed.gap).all()
    torch.testing.assert_close(fixed.attributions, plain)
    adaptive = tk.integrated_gradients(model, x, target=1, rule="adaptive", gap=False)
    assert torch.isfinite(adaptive.gap).all()  # the rule needs it
