"""The fourteen methods, their Taylor-term allocations (closed forms on monomials) and the
principle scores."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import taylor_kernels as tk
from taylor_kernels.attr import methods_gradient as G
from taylor_kernels.attr import methods_perturbation as P
from taylor_kernels.attr import methods_rules as R
from taylor_kernels.attr.methods_common import prepare
from taylor_kernels.attr.unification import (METHOD_NAMES, MethodSettings, Term, allocation,
                                             itemized_terms, monomial_network, polynomial_network,
                                             principle_departures, run_method)

D = 4
kappas = st.lists(st.integers(0, D - 1), min_size=1, max_size=3).map(lambda k: tuple(sorted(k)))


def smooth_mlp(bias=True, act=nn.Tanh):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7, bias=bias), act(), nn.Linear(7, 6, bias=bias),
                         nn.Softplus() if act is nn.Tanh else act(),
                         nn.Linear(6, 3, bias=bias)).double()


def small_cnn():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                         nn.Conv2d(3, 3, 3, padding=1), nn.Softplus(), nn.Flatten(),
                         nn.Linear(3 * 2 * 2, 3)).double()


def point(seed):
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + torch.rand(1, D, generator=g, dtype=torch.float64)
    b = torch.rand(1, D, generator=g, dtype=torch.float64) - 0.5
    return x, b


@settings(max_examples=15, deadline=None)
@given(kappa=kappas, seed=st.integers(0, 100))
def test_allocation_closed_forms(kappa, seed):
    x, b = point(seed)
    counts = torch.tensor([kappa.count(i) for i in range(D)], dtype=torch.float64)
    members = (counts > 0).double()
    s = MethodSettings(ig_steps=8)
    closed = {"integrated_gradients": counts / len(kappa),
              "shapley_value": members / members.sum(),
              "occlusion_1": members,
              "gradient_x_input": counts}
    for name, expect in closed.items():
        w = allocation(name, kappa, x, b, s)
        assert torch.allclose(w, expect, atol=1e-10), (name, kappa, w, expect)


@settings(max_examples=8, deadline=None)
@given(kappa=kappas, seed=st.integers(0, 100))
def test_deeplift_on_a_probe_realization_shares_like_ig(kappa, seed):
    # one power unit per polarization sign pattern, reference activations 0: the Rescale
    # multiplier is z^(k-1), which gives feature i the share kappa_i / |kappa|
    x, b = point(seed)
    counts = torch.tensor([kappa.count(i) for i in range(D)], dtype=torch.float64)
    w = allocation("deeplift_rescale", kappa, x, b)
    assert torch.allclose(w, counts / len(kappa), atol=1e-10)


def test_probe_networks_are_the_polynomials():
    x, b = point(3)
    delta = (x - b)[0]
    assert torch.allclose(monomial_network((0, 0, 2), b)(x)[0, 0], delta[0] ** 2 * delta[2])
    net = polynomial_network([(1.5, (0, 0, 1)), (-2.0, (2,)), (0.7, (1, 3))], b)
    expect = 1.5 * delta[0] ** 2 * delta[1] - 2 * delta[2] + 0.7 * delta[1] * delta[3]
    assert torch.allclose(net(x)[0, 0], expect)
    r = tk.taylor_decomposition(net, x, b, 0, order=3)
    assert abs(float(r.residual[0])) < 1e-12
    terms, top = itemized_terms(net, x, b, 0, order=3)
    values = {t.kappa: t.value for t in terms if abs(t.value) > 1e-12}
    assert set(values) == {(0, 0, 1), (2,), (1, 3)}
    assert abs(values[(1, 3)] - 0.7 * float(delta[1] * delta[3])) < 1e-12


def test_completeness_of_deeplift_shapley_ig():
    model = smooth_mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    b = 0.1 * torch.randn(5, dtype=torch.float64)
    for fn in (R.deeplift_rescale, P.shapley_value):
        assert fn(model, x, b, target=1).gap.abs().max() < 1e-12
    bg = b.unsqueeze(0)
    assert torch.allclose(R.deepshap(model, x, bg, b, 1).attributions,
                          R.deeplift_rescale(model, x, b, 1).attributions, atol=1e-14)
    assert torch.allclose(P.prediction_difference(model, x, bg, b, 1).attributions,
                          P.occlusion(model, x, b, 1).attributions, atol=1e-14)


def test_lrp_zero_passes_no_relevance_through_a_dead_unit():
    """epsilon=0 (LRP-0) divided a pooled window that ReLU zeroed by its zero sum: 0 / 0 made
    NaN attributions; a unit with zero output passes no relevance, as gradient x input."""
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(4, 1, bias=False)).double().eval()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[4].weight.copy_(torch.rand(1, 4, dtype=torch.float64) + 0.5)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) + 0.1
    x[:, 0, :2, :2] *= -1  # the top-left pool window is all zero after the ReLU
    lrp = R.lrp_epsilon(net, x, None, 0, epsilon=0.0).attributions
    assert torch.isfinite(lrp).all()
    torch.testing.assert_close(lrp, G.gradient_x_input(net, x, None, 0).attributions)


def test_lrp_epsilon_is_gradient_x_input_on_bias_free_relu():
    model = smooth_mlp(bias=False, act=nn.ReLU)
    x = torch.randn(4, 5, dtype=torch.float64)
    lrp = R.lrp_epsilon(model, x, None, 2, epsilon=0.0).attributions
    assert torch.allclose(lrp, G.gradient_x_input(model, x, None, 2).attributions, atol=1e-12)
    # z+ and alpha-beta conserve relevance on a bias-free ReLU net with positive inputs
    xp = x.abs()
    f = model(xp)[:, 2]
    for fn in (R.deep_taylor, R.lrp_alpha_beta):
        rel = fn(model, xp, None, 2).attributions.sum(1)
        assert torch.allclose(rel[f > 0], f[f > 0], atol=1e-10)


def test_sampled_shapley_approaches_exact():
    model = smooth_mlp()
    x = torch.randn(2, 5, dtype=torch.float64)
    problem, b = prepare(model, x, None, 0)
    exact, _ = P._exact_shapley(problem, problem.x, b)
    sampled, _ = P._sampled_shapley(problem, problem.x, b, 400, 0)
    assert (sampled - exact).abs().max() < 0.1 * exact.abs().max()
    assert torch.allclose(sampled.sum(1), exact.sum(1), atol=1e-12)


def test_occlusion_patch_windows():
    model = small_cnn()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    one = P.occlusion_patch(model, x, None, 1, window=1).attributions
    # a 1x1 window over both channels: the drop of removing a whole pixel, on each channel
    pts = x.unsqueeze(1).repeat(1, 16, 1, 1, 1).reshape(32, 2, 16)
    pts[torch.arange(32), :, torch.arange(16).repeat(2)] = 0
    with torch.no_grad():
        drop = model(x)[:, 1:2] - model(pts.reshape(32, 2, 4, 4))[:, 1].reshape(2, 16)
    assert torch.allclose(one, drop.reshape(2, 1, 4, 4).expand(2, 2, 4, 4), atol=1e-12)
    flat = P.occlusion_patch(smooth_mlp(), torch.randn(2, 5, dtype=torch.float64), None, 0,
                             window=1).attributions
    assert flat.shape == (2, 5)


def test_grad_cam_and_errors():
    cam = G.grad_cam(small_cnn().requires_grad_(False), torch.randn(2, 2, 4, 4, dtype=torch.float64), None, 0)
    assert cam.attributions.shape == (2, 2, 4, 4) and (cam.attributions >= 0).all()
    with pytest.raises(ValueError, match="Conv2d"):
        G.grad_cam(smooth_mlp(), torch.randn(1, 2, 2, 2, dtype=torch.float64), None, 0)
    with pytest.raises(TypeError, match="LayerNorm"):
        R.deeplift_rescale(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)).double(),
                           torch.randn(2, 3, dtype=torch.float64), None, 0)
    with pytest.raises(TypeError, match="nn.Sequential"):
        R.lrp_epsilon(lambda z: z.sum(1), torch.randn(2, 3), None, None)
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        R.lrp_alpha_beta(smooth_mlp(), torch.randn(1, 5, dtype=torch.float64), alpha=1, beta=1)


def test_principle_departures_and_terms():
    terms = [Term((0, 1), 2.0), Term((2, 2), -1.0)]
    fair = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 1, 0]], dtype=torch.float64)
    assert principle_departures(terms, fair) == (0.0, 0.0)
    occ = torch.tensor([[1.0, 1.0, 0, 0], [0, 0, 1, 0]], dtype=torch.float64)
    assert principle_departures(terms, occ) == (0.0, 1.0)
    gxi = torch.tensor([[1.0, 1.0, 0, 0], [0, 0, 2, 0]], dtype=torch.float64)
    assert principle_departures(terms, gxi) == (1.0, 1.0)
    # itemized terms of a polynomial network add up to f(x) - f(b)
    x, b = point(5)
    poly = nn.Sequential(nn.Linear(D, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    items, top = itemized_terms(monomial_network((0, 1, 1), b), x, b, 0, order=3)
    assert top == 3
    assert abs(sum(t.value for t in items) - float(((x - b)[0, 0] * (x - b)[0, 1] ** 2))) < 1e-12
    assert len(itemized_terms(poly, x, b, 0, order=3, max_sets=9)[0]) == D


def test_fourteen_methods_and_table():
    model = smooth_mlp()
    x = torch.randn(1, 5, dtype=torch.float64)
    out = tk.fourteen_methods(model, x, None, 1, settings=MethodSettings(permutations=4))
    assert list(out) == list(METHOD_NAMES) and len(out) == 14
    assert isinstance(out["grad_cam"], str)
    assert out["shapley_value"].gap.abs().max() < 1e-12
    # without a background, background methods use the baseline (here a number) as reference
    shap = run_method("deepshap", model, x, 0.1, 1, MethodSettings()).attributions
    assert torch.allclose(shap, R.deeplift_rescale(model, x, 0.1, 1).attributions, atol=1e-14)
    rng = torch.get_rng_state()
    table = tk.unification_table(model, x, None, 1, order=2, max_terms=4,
                                 settings=MethodSettings(ig_steps=8, eg_samples=8,
                                                         smoothgrad_samples=2))
    assert torch.equal(torch.get_rng_state(), rng)  # seeded: the global RNG does not move
    rows = {r.method: r for r in table.rows}
    assert rows["integrated_gradients"].p1 < 1e-4
    assert rows["shapley_value"].p2 < 1e-12 and rows["shapley_value"].p3 < 1e-12
    assert rows["occlusion_1"].p3 > 0.5 and rows["grad_cam"].p2 is None
    assert table.markdown().count("\n|") == 15
    assert table.plot() is not None


def test_background_methods_take_each_rows_own_baseline_without_a_background():
    """Without a background, EG / Prediction Difference / DeepSHAP use the baseline: each
    row's own (row 0's was used for every row: 40-90% off on the others)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(3, 4, dtype=torch.float64)
    res = tk.fourteen_methods(model, x, b, target=[0, 1, 0])
    torch.testing.assert_close(res["deepshap"].attributions,
                               res["deeplift_rescale"].attributions)
    torch.testing.assert_close(res["prediction_difference"].attributions,
                               res["occlusion_1"].attributions)
    for name in ("deepshap", "prediction_difference"):
        assert res[name].gap.shape == (3,)
    assert res["deepshap"].gap.abs().max() < 1e-12


def test_inputs_narrower_than_the_occlusion_window_name_the_method_that_cannot_run():
    f = lambda z: torch.tanh(2 * z[:, 0]) + z[:, 0] ** 3  # noqa: E731
    res = tk.fourteen_methods(f, torch.tensor([[0.7]], dtype=torch.float64))
    assert "larger than the 1 features" in res["occlusion_patch"]
    assert not isinstance(res["occlusion_1"], str)
    g = lambda z: torch.tanh(z.flatten(1)).sum(1)  # noqa: E731  (a function: no Grad-CAM)
    image = tk.fourteen_methods(g, torch.randn(2, 1, 1, 5, dtype=torch.float64))
    assert "1x5" in image["occlusion_patch"] and isinstance(image["grad_cam"], str)


@pytest.mark.parametrize("target", [(1, 2), torch.tensor([1])])
def test_row_by_row_backgrounds_keep_a_target_meant_for_every_row(target):
    """A tuple (one output index for every row) and a ``[1]`` tensor are not split by row:
    each row's result is the one it gets alone."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 6).double()
    shape = (-1, 2, 3) if isinstance(target, tuple) else (-1, 6)
    model = lambda z: torch.tanh(lin(z)).reshape(shape)  # noqa: E731
    x, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    whole = run_method("prediction_difference", model, x, b, target, MethodSettings())
    alone = [run_method("prediction_difference", model, x[i:i + 1], b[i:i + 1], target,
                        MethodSettings()) for i in range(3)]
    torch.testing.assert_close(whole.attributions, torch.cat([a.attributions for a in alone]))
    eg = run_method("expected_gradients", model, x, b, target, MethodSettings(eg_samples=4))
    assert eg.attributions.shape == x.shape


def test_smoothgrad_noise_follows_each_rows_own_range():
    """The noise std was sigma times the widest row's range of the batch: a row's result
    depended on the rows beside it (silently wrong)."""
    lin = nn.Linear(50, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(1.0)
    g = torch.Generator().manual_seed(0)
    small = torch.rand(1, 50, generator=g, dtype=torch.float64)
    big = 100 * torch.rand(1, 50, generator=g, dtype=torch.float64)
    alone = G.smoothgrad(lin, small, target=0, samples=16, seed=0).attributions
    batched = G.smoothgrad(lin, torch.cat([small, big]), target=0, samples=16,
                           seed=0).attributions
    torch.testing.assert_close(batched[:1], alone)
    noise = (batched - torch.cat([small, big])).std(dim=1) * 4  # std of a mean of 16
    ranges = torch.stack([small.max() - small.min(), big.max() - big.min()])
    torch.testing.assert_close(noise / ranges, torch.full((2,), 0.15, dtype=torch.float64),
                               rtol=0.35, atol=0)


@pytest.mark.parametrize("name", ["deeplift_rescale", "deepshap", "lrp_epsilon",
                                  "lrp_alpha_beta", "deep_taylor"])
def test_rules_take_in_place_activations(name):
    """``nn.ReLU(inplace=True)`` (torchvision style) crashed DeepLIFT and DeepSHAP (and with
    them fourteen_methods); the rules' numbers equal those of ``nn.ReLU()``."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                          nn.Linear(6, 2)).double()
    inplace = nn.Sequential(*[nn.ReLU(inplace=True) if isinstance(m, nn.ReLU) else m
                              for m in plain])
    x, b = torch.randn(3, 4, dtype=torch.float64), 0.3 * torch.randn(3, 4, dtype=torch.float64)
    x0 = x.clone()
    bg = torch.randn(2, 4, dtype=torch.float64)
    args = (x, bg, b, 1) if name == "deepshap" else (x, b, 1)
    got = getattr(R, name)(inplace, *args).attributions
    torch.testing.assert_close(got, getattr(R, name)(plain, *args).attributions)
    assert torch.equal(x, x0) and all(m.inplace for m in inplace if isinstance(m, nn.ReLU))


def test_table_when_no_taylor_term_is_nonzero_at_the_baseline():
    """Every hidden ReLU off at the zero baseline: no term to probe (torch.stack crashed)."""
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[0].bias.fill_(-1.0)
    x = torch.tensor([[2.0, 1.5, -0.5]], dtype=torch.float64)
    table = tk.unification_table(m, x, target=1, order=3,
                                 methods=("gradient_x_input", "integrated_gradients"))
    assert table.terms_probed == 0
    for row in table.rows:
        assert row.p1 is not None and row.p2 is None and "every Taylor term" in row.note


def test_table_checks_its_arguments_first(monkeypatch):
    from taylor_kernels.attr import unification_table as ut
    monkeypatch.setattr(ut, "taylor_decomposition", lambda *a, **k: pytest.fail("ran"))
    model = smooth_mlp()
    x = torch.randn(1, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="one tensor input"):
        tk.unification_table(model, (x,), target=1)
    with pytest.raises(ValueError, match="unknown methods"):
        tk.unification_table(model, x, target=1, methods=("integrated_gradient",))


def test_table_plot_leaves_the_matplotlib_backend_alone():
    """plot() called matplotlib.use("Agg"): a notebook's or GUI's backend was switched."""
    import matplotlib
    model = smooth_mlp()
    x = torch.randn(1, 5, dtype=torch.float64)
    table = tk.unification_table(model, x, None, 1, order=2, max_terms=2,
                                 methods=("gradient_x_input",))
    before = matplotlib.get_backend()
    matplotlib.use("svg", force=True)
    try:
        table.plot().savefig(__import__("io").BytesIO(), format="png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before, force=True)


@pytest.mark.parametrize("chunk", [4096, 5])
def test_perturbation_points_built_a_chunk_at_a_time_equal_the_definitions(chunk, monkeypatch):
    """Occlusion, patch occlusion and Prediction Difference build their points per chunk of
    model rows (Prediction Difference held ``[B, D, R, D]`` at once: 4.8 GB for a 3x32x32 image
    and 64 background rows); the numbers are the definitions' (brute force here)."""
    from taylor_kernels.attr import methods_common
    monkeypatch.setattr(methods_common, "EVAL_CHUNK", chunk)
    model = small_cnn()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)
    b = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)
    bg = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    f = lambda z: model(z)[:, 1]  # noqa: E731
    xf, bf, D = x.reshape(2, -1), b.reshape(2, -1), 32

    def at(flat):
        return f(flat.reshape(-1, 2, 4, 4))

    occ = torch.stack([at(xf) - at(torch.where(torch.arange(D) == i, bf, xf))
                       for i in range(D)], 1)
    torch.testing.assert_close(P.occlusion(model, x, b, 1).attributions.reshape(2, -1), occ)
    pd = torch.stack([at(xf) - torch.stack([at(torch.where(torch.arange(D) == i,
                                                           bg.reshape(3, -1)[j], xf))
                                            for j in range(3)]).mean(0) for i in range(D)], 1)
    torch.testing.assert_close(
        P.prediction_difference(model, x, bg, b, 1).attributions.reshape(2, -1), pd)
    masks = P._window_masks((2, 4, 4), 2, x.device)
    drops = torch.stack([at(xf) - at(torch.where(m, bf, xf)) for m in masks], 1)
    m = masks.double()
    torch.testing.assert_close(P.occlusion_patch(model, x, b, 1).attributions.reshape(2, -1),
                               drops @ m / m.sum(0).clamp_min(1))


def test_settings_may_be_a_dict_of_their_fields():
    """``settings={...}`` raised ``AttributeError: 'dict' object has no attribute 'window'``."""
    model = smooth_mlp()
    g = torch.Generator().manual_seed(0)
    x, b = torch.rand(2, 5, generator=g, dtype=torch.float64).split(1)
    got = tk.fourteen_methods(model, x, b, target=0, settings={"ig_steps": 8, "seed": 3})
    want = tk.fourteen_methods(model, x, b, target=0,
                               settings=MethodSettings(ig_steps=8, seed=3))
    for name in ("integrated_gradients", "expected_gradients", "smoothgrad"):
        torch.testing.assert_close(got[name].attributions, want[name].attributions)
    with pytest.raises(TypeError, match="steps_ig"):
        tk.fourteen_methods(model, x, b, target=0, settings={"steps_ig": 8})
    with pytest.raises(TypeError, match="settings must be a MethodSettings"):
        tk.fourteen_methods(model, x, b, target=0, settings=8)


def test_table_arguments_and_a_table_that_itemized_nothing():
    """With more features than max_sets no order was itemized, and every row said all Taylor
    terms were 0 (f(x) - f(b) was 1.26); max_terms 0, -5 and 1.5 were taken; one method name
    as a string was split into letters; methods=() built a table whose plot raised."""
    from taylor_kernels.attr.unification import polynomial_network
    b = torch.tensor([[0.2, -0.1, 0.3]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.7, -0.8]], dtype=torch.float64)
    net = polynomial_network([(1.3, (0,)), (0.9, (0, 1)), (0.5, (1, 1, 2))], b)
    tab = tk.unification_table(net, x, b, max_sets=2, methods=("integrated_gradients",))
    assert tab.itemized_order == 0 and "no order itemized" in tab.rows[0].note
    one = tk.unification_table(net, x, b, methods="integrated_gradients")
    assert [r.method for r in one.rows] == ["integrated_gradients"]
    for bad in (0, -5, 1.5):
        with pytest.raises(ValueError, match="max_terms"):
            tk.unification_table(net, x, b, max_terms=bad, methods=("integrated_gradients",))
    with pytest.raises(ValueError, match="at least one"):
        tk.unification_table(net, x, b, methods=())
