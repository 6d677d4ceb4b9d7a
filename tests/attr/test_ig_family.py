"""EG, SIG, noise tunnel and layer IG: axioms, chunking invariance, closed forms."""
from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taylor_kernels as tk
from taylor_kernels.attr.shapley_ig import coalition_sizes, sample_coalitions
from tests import models

SETTINGS = settings(max_examples=10, deadline=None)


def linear_model(D, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(D, 1).double()


# ---- expected gradients ---------------------------------------------------------------------
def test_eg_exact_on_linear_models():
    """Gradient is constant: EG = w * (x - mean of the drawn references), exactly."""
    lin = linear_model(6)
    x, bg = torch.randn(4, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    res = tk.expected_gradients(lin, x, bg, samples=7, seed=3)
    assert res.evaluations == 4 * 7
    assert res.gap.abs().max() < 1e-12  # completeness per sample holds for linear f


@SETTINGS
@given(seed=st.integers(0, 1000))
def test_eg_linear_in_model_and_dummy(seed):
    f, g = models.mlp(seed=seed, d_out=1), models.mlp(seed=seed + 1, d_out=1)
    with torch.no_grad():
        f[0].weight[:, 4] = 0
        g[0].weight[:, 4] = 0
    x, bg = torch.randn(3, 10, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    eg = lambda m: tk.expected_gradients(m, x, bg, samples=6, seed=seed).attributions  # noqa
    torch.testing.assert_close(eg(lambda z: 2 * f(z) - g(z)), 2 * eg(f) - eg(g))
    assert eg(f)[:, 4].abs().max() == 0


def test_eg_chunking_and_seed():
    net, x, bg = models.mlp(), torch.randn(3, 10, dtype=torch.float64), torch.randn(8, 10).double()
    a = tk.expected_gradients(net, x, bg, target=1, samples=9, seed=1, chunk_size=4)
    b = tk.expected_gradients(net, x, bg, target=1, samples=9, seed=1, chunk_size=100)
    c = tk.expected_gradients(net, x, bg, target=1, samples=9, seed=2)
    torch.testing.assert_close(a.attributions, b.attributions, rtol=1e-12, atol=1e-13)
    assert not torch.allclose(a.attributions, c.attributions)


def test_eg_draws_every_background_row():
    """Linear model: EG = w (x - mean of the drawn references); with two background rows and
    many draws per input both rows are drawn (the last one was never drawn by an off-by-one
    that only a one-row background showed, by crashing)."""
    lin = linear_model(6)
    x = torch.randn(2, 6, dtype=torch.float64)
    bg = torch.stack([torch.zeros(6), torch.ones(6)]).double()
    res = tk.expected_gradients(lin, x, bg, samples=64, seed=0)
    w = lin.weight[0].detach()
    drawn = x - res.attributions / w  # the mean drawn reference, in [0, 1] per input
    assert ((drawn > 0.2) & (drawn < 0.8)).all()


def test_eg_converges_to_ig_with_single_reference():
    net, x = models.mlp(), torch.randn(2, 10, dtype=torch.float64)
    ref = torch.zeros(1, 10, dtype=torch.float64)
    eg = tk.expected_gradients(net, x, ref, target=0, samples=4000, seed=0).attributions
    ig = tk.integrated_gradients(net, x, ref, target=0).attributions
    assert ((eg - ig).abs().max() / ig.abs().max()) < 0.05


def test_eg_differentiable_for_training():
    net, x, bg = models.mlp(), torch.randn(3, 10, dtype=torch.float64), torch.randn(4, 10).double()
    res = tk.expected_gradients(net, x, bg, target=0, samples=3, seed=0, create_graph=True)
    res.attributions.abs().sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


# ---- SIG ------------------------------------------------------------------------------------
def test_coalition_sizes_are_proportional():
    sizes = coalition_sizes(5, 20)
    assert torch.bincount(sizes, minlength=5).tolist() == [4] * 5
    present = sample_coalitions(3, 5, 20, torch.Generator().manual_seed(0))
    assert (present.sum(2) == sizes).all()


@SETTINGS
@given(seed=st.integers(0, 1000), M=st.integers(1, 12))
def test_sig_completeness_per_baseline(seed, M):
    """sum(attr) = mean_S (f(x) - f(b_S)) exactly for polynomials (exact quadrature)."""
    poly = models.random_polynomial(D=4, max_power=2, seed=seed)
    x = torch.randn(2, 4, dtype=torch.float64)
    res = tk.shapley_integrated_gradients(poly, x, 0.5, coalitions=M, seed=seed, steps=6)
    assert res.gap.abs().max() < 1e-10


def test_sig_dummy_and_groups():
    net = models.mlp(d_out=1)
    with torch.no_grad():
        net[0].weight[:, [2, 3]] = 0
    x = torch.randn(2, 10, dtype=torch.float64)
    mask = torch.tensor([0, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    res = tk.shapley_integrated_gradients(net, x, coalitions=16, seed=0, feature_mask=mask)
    assert res.attributions[:, [2, 3]].abs().max() == 0


def exact_shapley(f, x, ref):
    n = x.shape[0]
    phi = torch.zeros(n, dtype=torch.float64)
    v = lambda S: f(torch.where(torch.tensor([i in S for i in range(n)]), x, ref)[None])[0]  # noqa
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for k in range(n):
            w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for S in itertools.combinations(others, k):
                phi[i] += w * (v(S + (i,)) - v(S))
    return phi


def test_sig_proportions_exact_on_additive_games():
    """Additive f: every feature outside S gets its own term; P(i not in S) is the same for
    all i under proportional sampling, so SIG's proportions equal Shapley's."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, generator=g, dtype=torch.float64)
    f = lambda z: (a * torch.tanh(z)).sum(1)  # noqa: E731
    x = torch.randn(1, 5, generator=g, dtype=torch.float64)
    sig = tk.shapley_integrated_gradients(f, x, coalitions=5 * 400, seed=0).attributions[0]
    phi = exact_shapley(f, x[0], torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(sig / sig.sum(), phi / phi.sum(), rtol=0.05, atol=0.01)


def test_sig_rejects_multiple_references():
    with pytest.raises(ValueError, match="one reference"):
        tk.shapley_integrated_gradients(models.mlp(d_out=1), torch.randn(2, 10).double(),
                                        torch.zeros(2, 3, 10, dtype=torch.float64))


# ---- noise tunnel ---------------------------------------------------------------------------
def test_noise_tunnel_zero_noise_equals_method():
    net, x = models.mlp(), torch.randn(3, 10, dtype=torch.float64)
    ig = tk.integrated_gradients(net, x, target=2, steps=10).attributions
    sg = tk.noise_tunnel(tk.integrated_gradients, net, x, target=2, steps=10, nt_samples=3,
                         stdevs=0.0).attributions
    torch.testing.assert_close(sg, ig, rtol=1e-12, atol=1e-13)
    vg = tk.noise_tunnel(tk.integrated_gradients, net, x, target=2, steps=10, nt_samples=3,
                         stdevs=0.0, nt_type="vargrad").attributions
    assert vg.abs().max() < 1e-12


def test_noise_tunnel_aggregates_per_input_copies():
    net, x = models.mlp(), torch.randn(2, 10, dtype=torch.float64)
    bl = torch.randn(2, 10, dtype=torch.float64)
    kw = dict(target=[0, 1], steps=8, nt_samples=4, stdevs=0.3, seed=5)
    sg = tk.noise_tunnel(tk.integrated_gradients, net, x, bl, **kw)
    sq = tk.noise_tunnel(tk.integrated_gradients, net, x, bl, nt_type="smoothgrad_sq", **kw)
    vg = tk.noise_tunnel(tk.integrated_gradients, net, x, bl, nt_type="vargrad", **kw)
    torch.testing.assert_close(vg.attributions, sq.attributions - sg.attributions ** 2)
    assert (vg.attributions >= -1e-12).all() and sg.evaluations == 2 * 4 * 8
    # copies of input b use input b's baseline and target: completeness holds per copy
    assert sg.gap.abs().max() < 1e-6  # 8-node quadrature error
    # (completeness holds for any baseline a copy is given: without noise the copies must
    # give each input's own IG, tensor targets and per-row baselines included)
    x3, bl3, t3 = torch.randn(3, 10, dtype=torch.float64), 0.2 * torch.randn(
        3, 10, dtype=torch.float64), torch.tensor([0, 1, 2])
    plain = tk.integrated_gradients(net, x3, bl3, target=t3, steps=16).attributions
    still = tk.noise_tunnel(tk.integrated_gradients, net, x3, baselines=bl3, target=t3,
                            nt_samples=4, stdevs=0.0, seed=0, steps=16).attributions
    torch.testing.assert_close(still, plain, rtol=1e-10, atol=1e-12)


def test_noise_tunnel_shares_one_input_baselines_and_backgrounds_when_d_equals_b():
    """A baseline shaped like one input (``[D]``) with ``D == B`` is shared by every copy, not
    taken for ``B`` per-row baselines (it was repeated and the call failed); nor is a
    background set of ``B`` rows (it was repeated, moving the references drawn)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3)).double()
    x, b = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    kw = dict(target=1, nt_samples=3, stdevs=0.0, seed=0)
    got = tk.noise_tunnel(tk.integrated_gradients, net, x, baselines=b, steps=8, **kw)
    want = tk.integrated_gradients(net, x, b[None], target=1, steps=8)
    torch.testing.assert_close(got.attributions, want.attributions)
    got = tk.noise_tunnel(tk.integrated_gradients, net, x, b, steps=8, **kw)  # positional
    torch.testing.assert_close(got.attributions, want.attributions)
    rows = []

    @functools.wraps(tk.expected_gradients)  # (its signature: the background is named)
    def eg(model, inputs, background, *args, **kwargs):
        rows.append(background.shape[0])
        return tk.expected_gradients(model, inputs, background, *args, **kwargs)

    tk.noise_tunnel(eg, net, x, torch.randn(4, 4, dtype=torch.float64), samples=6, **kw)
    assert rows == [4]


def test_noise_tunnel_refuses_second_order_methods_before_any_forward():
    calls = []
    net = models.mlp()
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 10, dtype=torch.float64)
    try:
        for method in (tk.integrated_hessians, tk.expected_hessians):
            with pytest.raises(TypeError, match="returns interactions"):
                tk.noise_tunnel(method, net, x, target=0, nt_samples=2)
    finally:
        hook.remove()
    assert not calls


# ---- layer IG -------------------------------------------------------------------------------
def test_layer_ig_completeness_and_chunking():
    net, x = models.cnn(), torch.randn(3, 2, 8, 8, dtype=torch.float64)
    a = tk.layer_integrated_gradients(net, net.c2, x, target=1, rule="adaptive", tol=1e-8,
                                      chunk_size=5)
    b = tk.layer_integrated_gradients(net, net.c2, x, target=1, rule="adaptive", tol=1e-8)
    assert a.attributions.shape == (3, 4, 4, 4)
    torch.testing.assert_close(a.attributions, b.attributions, rtol=1e-12, atol=1e-13)
    fx, f0 = net(x)[:, 1], net(torch.zeros_like(x))[:, 1]
    torch.testing.assert_close(a.attributions.flatten(1).sum(1), (fx - f0).detach(),
                               rtol=1e-7, atol=1e-9)


def test_layer_ig_on_layer_input_of_linear_head_is_exact():
    net, x = models.mlp(), torch.randn(2, 10, dtype=torch.float64)
    res = tk.layer_integrated_gradients(net, net[4], x, target=0, attribute_to_layer_input=True,
                                        steps=2)
    h = net[:4](x).detach()
    torch.testing.assert_close(res.attributions, net[4].weight[0].detach() * (h - net[:4](
        torch.zeros_like(x)).detach()))


def test_layer_ig_rejects_unused_layer():
    net = models.mlp()
    with pytest.raises(ValueError, match="not called"):
        tk.layer_integrated_gradients(net, torch.nn.Linear(2, 2), torch.randn(2, 10).double(),
                                      target=0)


def test_noise_tunnel_repeats_a_user_methods_per_row_positional_arguments():
    """Only the library's names were taken as per row: a user method's ``(model, x, base,
    tgt)`` got its baselines and targets unrepeated and failed."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    b, t = torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 2])

    def mine(model, inputs, base, tgt):
        return tk.integrated_gradients(model, inputs, base, tgt, steps=8)

    got = tk.noise_tunnel(mine, net, x, b, t, nt_samples=3, stdevs=0.0, seed=0)
    want = tk.integrated_gradients(net, x, b, t, steps=8)
    torch.testing.assert_close(got.attributions, want.attributions)


@pytest.mark.parametrize("method", ["eg", "sig"])
def test_gap_false_skips_the_endpoint_forwards(method):
    """EG and SIG always ran the forwards of the inputs and their B*M references for the gap
    (EG 1.5-2x Captum's GradientShap on small vision models, which runs them only for a
    delta): gap=False skips them, with the same attributions and a NaN gap."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double()
    x, bg = torch.randn(3, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    rows = []
    model.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))

    def call(gap):
        rows.clear()
        if method == "eg":
            res = tk.expected_gradients(model, x, bg, target=1, samples=8, seed=3, gap=gap)
        else:
            res = tk.shapley_integrated_gradients(model, x, target=1, coalitions=4, steps=4,
                                                  seed=3, gap=gap)
        return res, sum(rows)
    (full, with_gap), (lean, without) = call(True), call(False)
    torch.testing.assert_close(lean.attributions, full.attributions, rtol=1e-12, atol=1e-14)
    assert lean.gap.isnan().all() and full.gap.isfinite().all()
    assert without <= with_gap - (3 + 3 * (8 if method == "eg" else 4))
