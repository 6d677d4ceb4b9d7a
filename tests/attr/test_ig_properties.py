"""IG axioms as property tests: completeness, linearity, dummy, symmetry; adaptive rule."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taylor_kernels as tk
from tests import models

SETTINGS = settings(max_examples=15, deadline=None)


@SETTINGS
@given(seed=st.integers(0, 10_000), D=st.integers(1, 5), K=st.integers(1, 3))
def test_completeness_exact_on_polynomials(seed, D, K):
    """Gauss-Legendre with n nodes is exact for degree 2n-1: the gap is rounding only."""
    model = models.random_polynomial(D=D, max_power=3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, D, generator=g, dtype=torch.float64)
    bl = torch.randn(3, K, D, generator=g, dtype=torch.float64)
    res = tk.integrated_gradients(model, x, bl, steps=8)  # path degree <= 3*D - 1 <= 14 < 16
    fx = model(x)
    fb = model(bl.reshape(-1, D)).reshape(3, K).mean(1)
    torch.testing.assert_close(res.attributions.sum(1), fx - fb, rtol=1e-10, atol=1e-10)
    assert res.gap.abs().max() < 1e-10


@SETTINGS
@given(seed=st.integers(0, 10_000), a=st.floats(-3, 3), c=st.floats(-3, 3))
def test_linearity_in_the_model(seed, a, c):
    f, g = models.mlp(seed=seed, d_out=1), models.mlp(seed=seed + 1, d_out=1)
    x = torch.randn(4, 10, dtype=torch.float64)
    combo = lambda z: a * f(z) + c * g(z)  # noqa: E731
    lhs = tk.integrated_gradients(combo, x, steps=10).attributions
    rhs = (a * tk.integrated_gradients(f, x, steps=10).attributions
           + c * tk.integrated_gradients(g, x, steps=10).attributions)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-10)


@SETTINGS
@given(seed=st.integers(0, 10_000), dummy=st.integers(0, 9))
def test_dummy_feature_gets_zero(seed, dummy):
    net = models.mlp(seed=seed, d_out=2)
    with torch.no_grad():
        net[0].weight[:, dummy] = 0  # the model ignores feature `dummy`
    x = torch.randn(3, 10, dtype=torch.float64)
    res = tk.integrated_gradients(net, x, torch.randn(3, 10, dtype=torch.float64), target=1)
    assert res.attributions[:, dummy].abs().max() == 0


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_symmetry(seed):
    """f symmetric in features 0 and 1, x_0 = x_1, b_0 = b_1  =>  equal attributions."""
    net = models.mlp(seed=seed, d_in=10, d_out=1)
    sym = lambda z: net(z) + net(z[:, [1, 0] + list(range(2, 10))])  # noqa: E731
    x = torch.randn(3, 10, dtype=torch.float64)
    x[:, 1] = x[:, 0]
    attr = tk.integrated_gradients(sym, x, steps=12).attributions
    torch.testing.assert_close(attr[:, 0], attr[:, 1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", [torch.nn.Tanh, torch.nn.GELU], ids=["tanh", "gelu"])
@pytest.mark.parametrize("tol", [1e-4, 1e-7])
def test_adaptive_meets_tolerance_with_few_evaluations(act, tol):
    torch.manual_seed(1)
    net = models.mlp(act=act, d_in=12, hidden=32)
    with torch.no_grad():  # sharper than default init: the path integrand is not trivial
        for p in net.parameters():
            p.mul_(2.0)
    x = torch.randn(8, 12, dtype=torch.float64)
    res = tk.integrated_gradients(net, x, target=0, rule="adaptive", tol=tol)
    delta = res.attributions.sum(1) - res.gap
    assert (res.gap.abs() <= tol * delta.abs() + 1e-13).all()
    assert res.evaluations == int(res.nodes_per_input.sum())
    assert res.nodes_per_input.max() <= 63
    if tol == 1e-4:
        assert res.evaluations <= 50 * 8 / 3  # a third of Captum's default 50 steps
    bl = 0.5 * torch.randn(8, 3, 12, dtype=torch.float64)  # K = 3: nodes count every path
    res = tk.integrated_gradients(net, x, bl, target=0, rule="adaptive", tol=tol)
    assert res.evaluations == int(res.nodes_per_input.sum())


class _LinearAndCurved(torch.nn.Module):
    """Output 0 linear in ``x`` (converges at the first level), output 1 curved; ``scale``
    (per row) multiplies the input."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))

    def forward(self, x, scale):
        x = x * scale
        return torch.stack([x @ self.w, torch.tanh(3 * x).pow(3).sum(1)], 1)


def test_adaptive_refines_the_right_rows_with_per_row_targets_and_args():
    """Rows stop refining at different levels; the later passes run only the rows still
    open and must give each its own target and forward args (mapping them by position in
    the pass gave row 1 row 0's target: off by 2.1)."""
    torch.manual_seed(0)
    m = _LinearAndCurved()
    x = torch.randn(3, 4, dtype=torch.float64)
    target, scale = torch.tensor([0, 1, 1]), torch.tensor([[1.0], [1.5], [0.7]],
                                                           dtype=torch.float64)
    got = tk.integrated_gradients(m, x, target=target, rule="adaptive", tol=1e-9,
                                  additional_forward_args=(scale,))
    assert got.nodes_per_input[0] < got.nodes_per_input[1]
    gold = tk.integrated_gradients(m, x, target=target, steps=400,
                                   additional_forward_args=(scale,)).attributions
    torch.testing.assert_close(got.attributions, gold, rtol=0, atol=1e-8)


def test_adaptive_warns_when_levels_run_out():
    """A kink-heavy function the nested rule cannot integrate to 1e-12: say so, don't hide it."""
    f = lambda z: torch.relu(torch.sin(40 * z)).sum(1)  # noqa: E731
    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="miss the completeness tolerance"):
        res = tk.integrated_gradients(f, x, rule="adaptive", tol=1e-12)
    assert (res.nodes_per_input == 63).any()


def test_multiple_baselines_average():
    net = models.mlp()
    x = torch.randn(2, 10, dtype=torch.float64)
    bl = torch.randn(2, 3, 10, dtype=torch.float64)
    both = tk.integrated_gradients(net, x, bl, target=0, steps=10).attributions
    each = [tk.integrated_gradients(net, x, bl[:, k], target=0, steps=10).attributions
            for k in range(3)]
    torch.testing.assert_close(both, sum(each) / 3, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_model_accumulates_in_float32(dtype):
    net = models.mlp(dtype=dtype)
    x = torch.randn(3, 10, dtype=dtype)
    res = tk.integrated_gradients(net, x, target=0, steps=32)
    assert res.attributions.dtype == torch.float32
    ref = tk.integrated_gradients(models.mlp(), x.double(), target=0, steps=32).attributions
    scale = ref.abs().max()
    tol = 0.05 if dtype == torch.bfloat16 else 1e-5
    assert ((res.attributions.double() - ref).abs().max() / scale) < tol
