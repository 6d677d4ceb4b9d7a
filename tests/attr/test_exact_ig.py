"""rule="exact": IG of piecewise-linear networks as a finite sum over the regions a path
crosses. Checked against fine float64 Riemann sums, completeness, hand-built breakpoints,
random networks (hypothesis), the fallbacks, and the EG / SIG / Captum entry points."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import taylor_kernels as tk
from taylor_kernels.attr.exact_ig import groups_by_size
from taylor_kernels.engine import exact_path
from taylor_kernels.engine.exact_rules import windows


def relu_mlp(d_in=6, hidden=12, d_out=3, act=nn.ReLU, depth=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    mods, w = [], d_in
    for _ in range(depth):
        mods += [nn.Linear(w, hidden), act()]
        w = hidden
    return nn.Sequential(*mods, nn.Linear(w, d_out)).to(dtype).eval()


class PoolCNN(nn.Module):
    """conv -> BN(eval) -> PReLU -> maxpool(3, s2, p1) -> conv -> ReLU + residual
    hardtanh(channel mean) -> leaky ReLU -> avgpool -> linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.act = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.PReLU(3)
        self.c2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        h = nn.functional.max_pool2d(self.act(self.bn(self.c1(x))), 3, stride=2, padding=1)
        h = torch.relu(self.c2(h)) + nn.functional.hardtanh(h.mean(1, keepdim=True))
        h = nn.functional.avg_pool2d(nn.functional.leaky_relu(h), 2)
        return self.fc(torch.flatten(h, 1))


def pool_cnn(dtype=torch.float64):
    torch.manual_seed(1)
    m = PoolCNN()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.to(dtype).eval()


def riemann_ig(model, x, baseline, target, n=100_000, chunk=25_000):
    """Midpoint Riemann IG with ``n`` steps in float64 (error O(regions / n))."""
    ts = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        d = x[i] - baseline[i]
        for j in range(0, n, chunk):
            t = ts[j:j + chunk].view((-1,) + (1,) * d.dim())
            p = (baseline[i] + t * d).requires_grad_(True)
            (g,) = torch.autograd.grad(model(p)[:, target].sum(), p)
            out[i] += d * g.sum(0) / n
    return out


def rel_gap(res, model, x, baseline, target):
    with torch.no_grad():
        delta = model(x)[:, target] - model(baseline)[:, target]
    return (res.gap.abs() / delta.abs()).max().item()


def test_mlp_matches_riemann_and_is_complete():
    model, x = relu_mlp(), torch.randn(3, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = tk.integrated_gradients(model, x, target=1, rule="exact")
    ref = riemann_ig(model, x, torch.zeros_like(x), 1)
    assert (res.attributions - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert rel_gap(res, model, x, torch.zeros_like(x), 1) <= 1e-10
    assert res.regions.shape == (3, 1) and (res.regions > 1).all()
    assert res.evaluations >= int(res.regions.sum())


def test_cnn_with_pooling_matches_riemann():
    model, x = pool_cnn(), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    b = 0.3 * torch.randn_like(x)
    res = tk.integrated_gradients(model, x, b, target=2, rule="exact")
    ref = riemann_ig(model, x, b, 2)
    assert (res.attributions - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert rel_gap(res, model, x, b, 2) <= 1e-10


def test_float32_completeness():
    model, x = pool_cnn(torch.float32), torch.randn(4, 1, 4, 4)
    res = tk.integrated_gradients(model, x, target=0, rule="exact")
    assert res.attributions.dtype == torch.float32
    assert rel_gap(res, model, x, torch.zeros_like(x), 0) <= 1e-5


class Kinked(nn.Module):
    """f(x) = relu(x0 - 0.3) + relu(0.7 - x0) + max(2 x1 - 0.5, x2) + hardtanh(4 x3 - 1)."""

    def forward(self, x):
        a = torch.relu(x[:, :1] - 0.3) + torch.relu(0.7 - x[:, :1])
        m = nn.functional.max_pool1d(torch.stack([2 * x[:, 1] - 0.5, x[:, 2]], 1)[:, None], 2)
        return a[:, 0] + m[:, 0, 0] + nn.functional.hardtanh(4 * x[:, 3] - 1)


def test_hand_built_breakpoints():
    """Kinks at t = 0.3, 0.7 (relus), 0.5 (max switches; hardtanh leaves [-1, 1]; it sits on
    its lower kink at t = 0, which is no breakpoint): 4 regions; IG by hand below."""
    x = torch.ones(1, 4, dtype=torch.float64)
    plan_res = tk.integrated_gradients(Kinked(), x, rule="exact")
    assert plan_res.regions.item() == 4
    # x0: slope -1 on [0, .3], 0 on [.3, .7], +1 on [.7, 1] -> -0.3 + 0.3 = 0
    # x1, x2: max is x2 (slope 1) on [0, .5], 2 x1 - .5 (slope 2) after -> 1.0 and 0.5
    # x3: hardtanh(4t - 1) has slope 4 on [0, .5] -> 2.0
    want = torch.tensor([[0.0, 1.0, 0.5, 2.0]], dtype=torch.float64)
    assert torch.allclose(plan_res.attributions, want, atol=1e-14)


def test_kink_on_the_baseline_and_ties():
    """Duplicated units cross together; a unit sitting on its kink at t = 0 takes the piece it
    enters (decided by the slope)."""
    lin = nn.Linear(2, 3).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        lin.bias.copy_(torch.tensor([-0.5, -0.5, 0.0]))
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 1).double())
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    res = tk.integrated_gradients(model, x, rule="exact")
    assert res.regions.item() == 2
    w = model[2].weight[0].detach()
    want = torch.stack([0.5 * (w[0] + w[1]), w[2]]).view(1, 2)
    assert torch.allclose(res.attributions, want, atol=1e-14)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.integers(3, 16), depth=st.integers(1, 3),
       act=st.sampled_from([nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.ReLU6]))
def test_random_networks_property(seed, width, depth, act):
    model = relu_mlp(d_in=5, hidden=width, depth=depth, act=act, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(2, 5, generator=g, dtype=torch.float64)
    b = torch.randn(2, 5, generator=g, dtype=torch.float64)
    res = tk.integrated_gradients(model, x, b, target=0, rule="exact")
    with torch.no_grad():
        delta = model(x)[:, 0] - model(b)[:, 0]
    assert (res.gap.abs() <= 1e-10 * delta.abs().clamp_min(1e-3)).all()
    ref = riemann_ig(model, x, b, 0, n=20_000)
    assert (res.attributions - ref).abs().max() <= 2e-3 * ref.abs().max().clamp_min(1e-6)


def test_tuple_inputs_forward_args_and_several_baselines():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(4, 8)
            self.out = nn.Linear(16, 2)

        def forward(self, u, v, scale):
            h = torch.cat([torch.relu(self.a(u)), nn.functional.relu(self.b(v)) * scale], 1)
            return self.out(h)

    torch.manual_seed(0)
    model = Two().double()
    u, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    bu, bv = torch.randn(2, 3, 3, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    scale = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    res = tk.integrated_gradients(model, (u, v), (bu, bv), target=1,
                                  additional_forward_args=(scale,), rule="exact")
    assert res.regions.shape == (2, 3)
    gl = tk.integrated_gradients(model, (u, v), (bu, bv), target=1,
                                 additional_forward_args=(scale,), steps=20_000,
                                 rule="riemann_middle")
    for a, r in zip(res.attributions, gl.attributions):
        assert (a - r).abs().max() <= 1e-4 * r.abs().max()
    assert res.gap.abs().max() <= 1e-12


def test_unsupported_model_falls_back_with_warning():
    model, x = relu_mlp(act=nn.Tanh), torch.randn(2, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="Tanh.*falling back to rule='adaptive'"):
        res = tk.integrated_gradients(model, x, target=0, rule="exact")
    ada = tk.integrated_gradients(model, x, target=0, rule="adaptive")
    assert res.regions.tolist() == [[-1], [-1]]  # (every path fell back)
    assert torch.allclose(res.attributions, ada.attributions, rtol=0, atol=1e-14)


@pytest.mark.parametrize("to_input", [False, True])
def test_layer_ig_of_a_float32_model_falls_back_with_warning(to_input):
    """The trace keeps the layer-replaced model whole and ran it on float64 constants: a
    float32 model raised a dtype error. It falls back to the adaptive rule, as documented."""
    model, x = relu_mlp().float(), torch.randn(3, 6)
    kw = dict(target=1, attribute_to_layer_input=to_input)
    with pytest.warns(RuntimeWarning, match="falling back to rule='adaptive'"):
        res = tk.layer_integrated_gradients(model, model[2], x, rule="exact", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the adaptive rule's own tolerance notes)
        ada = tk.layer_integrated_gradients(model, model[2], x, rule="adaptive", **kw)
    torch.testing.assert_close(res.attributions, ada.attributions, rtol=1e-5, atol=1e-7)


class KinkedMaximum(nn.Module):
    """Piecewise linear, but through ``torch.maximum``, which the exact rule does not trace."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 2)

    def forward(self, z):
        h = self.a(z)
        h = nn.functional.leaky_relu(h, 0.1) + 0.3 * h.abs() - torch.clamp(h, -0.2, 0.4)
        return self.b(torch.maximum(h, -0.5 * h))


def test_fallback_that_misses_its_tolerance_says_so():
    """The adaptive fallback warns as rule='adaptive' does when its finest level misses tol
    (it stayed silent with a 2% completeness gap)."""
    torch.manual_seed(0)
    model = KinkedMaximum().double()  # torch.maximum has no exact rule: kinks, adaptive rule
    x = torch.randn(3, 5, dtype=torch.float64)
    b = 0.3 * torch.randn(3, 5, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = tk.integrated_gradients(model, x, b, target=1, rule="exact")
        ada = tk.integrated_gradients(model, x, b, target=1, rule="adaptive")
        tk.integrated_gradients(model, x, b, target=1, rule="exact", tol=1e-4)  # said once
    missed = [str(w.message) for w in seen if "miss the completeness tolerance" in str(w.message)]
    assert len(missed) == 3 and missed[0] == missed[1] == missed[2]
    torch.testing.assert_close(res.gap, ada.gap, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("where", ["module", "global"])
def test_hooked_model_is_refused(where):
    """Forward hooks (a module's, or global ones) are invisible to torch.fx: such a model
    falls back (an inner hook passed the check of the ends when it changed neither)."""
    model, x = relu_mlp(), torch.randn(2, 6, dtype=torch.float64)
    handle = model[0].register_forward_hook(lambda m, i, o: 2 * o) if where == "module" else \
        torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.warns(RuntimeWarning, match="has forward hooks"):
            res = tk.integrated_gradients(model, x, target=0, rule="exact")
    finally:
        handle.remove()
    assert res.regions.tolist() == [[-1], [-1]]  # (every path fell back)


def test_max_regions_fallback_per_input():
    model = relu_mlp(hidden=16)
    x = torch.cat([1e-3 * torch.ones(1, 6), 3 * torch.randn(2, 6)]).double()
    full = tk.integrated_gradients(model, x, target=0, rule="exact")
    cap = int(full.regions[0, 0])
    assert cap < int(full.regions.max())
    with pytest.warns(RuntimeWarning, match="more than max_regions"):
        res = tk.integrated_gradients(model, x, target=0, rule="exact", max_regions=cap)
    over = full.regions[:, 0] > cap
    assert (res.regions[over] == -1).all() and (res.regions[~over] == full.regions[~over]).all()
    assert torch.allclose(res.attributions[~over], full.attributions[~over], atol=1e-14)
    with warnings.catch_warnings():  # adaptive misses its tolerance on ReLU kinks
        warnings.simplefilter("ignore")
        ada = tk.integrated_gradients(model, x[over], target=0, rule="adaptive")
    assert torch.allclose(res.attributions[over], ada.attributions, atol=1e-12)


def test_padding_groups_and_windows():
    groups = groups_by_size(torch.tensor([10, 3, 13, 100, 4, 11, 40]), slack=8)
    assert [sorted(g.tolist()) for g in groups] == [[0, 1, 4, 5], [2], [6], [3]]
    t = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    for kw in (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
               dict(kernel_size=2, stride=3, dilation=2, ceil_mode=False)):
        k = (kw["kernel_size"],) * 2
        w = windows(t, k, (kw["stride"],) * 2, (kw.get("padding", 0),) * 2,
                    (kw.get("dilation", 1),) * 2, kw["ceil_mode"], -torch.inf)
        assert torch.equal(w.max(-1).values, nn.functional.max_pool2d(t, **kw))


def test_eg_sig_and_captum_front():
    model, x = relu_mlp(), torch.randn(2, 6, dtype=torch.float64)
    bg = torch.randn(5, 6, dtype=torch.float64)
    eg = tk.expected_gradients(model, x, bg, target=0, samples=4, seed=0, rule="exact")
    assert eg.regions.shape == (2, 4) and eg.gap.abs().max() <= 1e-12
    sig = tk.shapley_integrated_gradients(model, x, target=0, coalitions=4, seed=0,
                                          rule="exact")
    assert sig.regions.shape == (2, 4) and sig.gap.abs().max() <= 1e-12
    from taylor_kernels.captum import IntegratedGradients
    attr, delta = IntegratedGradients(model).attribute(x, target=0, method="exact",
                                                       return_convergence_delta=True)
    ours = tk.integrated_gradients(model, x, target=0, rule="exact")
    assert torch.allclose(attr, ours.attributions, rtol=0, atol=1e-14)
    assert delta.abs().max() <= 1e-12
    unscaled = IntegratedGradients(model, multiply_by_inputs=False).attribute(
        x, target=0, method="exact")
    assert torch.allclose(unscaled * x, attr, atol=1e-12)


def test_create_graph_is_refused():
    with pytest.raises(ValueError, match="create_graph"):
        tk.integrated_gradients(relu_mlp(), torch.randn(1, 6, dtype=torch.float64), target=0,
                                rule="exact", create_graph=True)


def test_search_is_batched_over_segments():
    """First-layer kinks split the paths: far fewer sequential passes than regions."""
    from taylor_kernels.engine.path_engine import endpoint_values
    from taylor_kernels.engine.problem import make_problem
    model, x = relu_mlp(hidden=32), 3 * torch.randn(2, 6, dtype=torch.float64)
    problem = make_problem(model, x, None, 0)
    plan = exact_path.plan(problem, *endpoint_values(problem))
    assert plan.passes < int(plan.regions.max()) / 2
    assert torch.allclose(plan.weights.sum(-1), torch.ones(2, 1, dtype=torch.float64))


def test_demo_relu_cnn_comparison():
    from taylor_kernels.demo.exact import DigitsReluCNN, compare
    torch.manual_seed(0)
    model = DigitsReluCNN().double().eval()
    res = compare(model, torch.rand(2, 1, 8, 8, dtype=torch.float64))
    assert (res["regions"] > 1).all() and (res["exact_rel_gap"] <= 1e-10).all()
    assert (res["gl50_error"] > 0).all()


class Seq1d(nn.Module):
    """Conv1d, MaxPool1d(ceil_mode), a concatenated skip, Dropout/Identity (eval),
    AdaptiveAvgPool1d, ReLU6, Flatten, a functional linear and abs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.pool = nn.MaxPool1d(2, ceil_mode=True)
        self.body = nn.Sequential(nn.Dropout(0.3), nn.Identity(), nn.AdaptiveAvgPool1d(2),
                                  nn.ReLU6(), nn.Flatten())
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        h = torch.cat([self.pool(torch.relu(self.conv(x))), x[:, :, ::2]], dim=1)
        h = self.body(h)
        return nn.functional.linear(torch.abs(h - 0.1), self.head.weight[:, :h.shape[1]])


def test_1d_model_with_pools_skip_and_functional_ops():
    torch.manual_seed(3)
    model, x = Seq1d().double().eval(), torch.randn(2, 2, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = tk.integrated_gradients(model, x, target=1, rule="exact")
    ref = riemann_ig(model, x, torch.zeros_like(x), 1)
    assert (res.attributions - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert res.gap.abs().max() <= 1e-12


def test_bench_family_smoke():
    from taylor_kernels.benchmarks import cases_exact
    result = cases_exact.run("smoke", torch.device("cpu"), log=lambda msg: None)
    (row,) = result["rows"]
    assert "error" not in row and row["exact_rel_gap"] <= 1e-10 and row["regions_max"] >= 1
    assert "exact" in cases_exact.tables(result)[0]


def test_constants_built_from_the_input():
    """zeros_like / new_ones of a path tensor are constants (no slope)."""
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(4, 6), nn.Linear(6, 1)

        def forward(self, x):
            shift = torch.zeros_like(x[:, :1]) + x.new_ones(x.shape[0], 6) * 0.1
            return self.out(torch.relu(self.lin(x) + shift))

    torch.manual_seed(0)
    model, x = Shifted().double(), torch.randn(2, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = tk.integrated_gradients(model, x, rule="exact")
    ref = riemann_ig(lambda p: model(p)[:, None], x, torch.zeros_like(x), 0)
    assert (res.attributions.squeeze() - ref.squeeze()).abs().max() <= 1e-4 * ref.abs().max()


def _midpoint_ig(model, x, b, target=0, n=20000):
    """IG by a composite midpoint rule with ``n`` steps (float64), per row."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    out = []
    for i in range(x.shape[0]):
        p = (b[i] + t[:, None] * (x[i] - b[i])).requires_grad_(True)
        (g,) = torch.autograd.grad(model(p)[:, target].sum(), p)
        out.append((x[i] - b[i]) * g.mean(0))
    return torch.stack(out)


class _Broadcast(nn.Module):
    """A path tensor broadcast by a constant (``h[:, None] + pos``) and summed back."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(3, 5), nn.Linear(5, 2)
        self.pos = nn.Parameter(torch.randn(1, 4, 5))

    def forward(self, x):
        h = F.relu(self.a(x)).unsqueeze(1)
        return self.o(F.relu((h + self.pos).sum(1)))


class _Flagged(nn.Module):
    """``forward`` reads a plain attribute: the trace must follow it when it changes."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.final_relu = nn.Linear(2, 2), nn.Linear(4, 1), False
        with torch.no_grad():
            self.l1.weight[:] = torch.tensor([[1., 0.], [-1., 0.]])
            self.l1.bias[:] = torch.tensor([-.5, .5])
            self.l2.weight[:] = torch.tensor([[1., 1., -1., 1.]])
            self.l2.bias[:] = -0.2

    def forward(self, x):
        out = self.l2(torch.cat([F.relu(self.l1(x)), x], 1))
        return F.relu(out) if self.final_relu else out


def test_traces_that_do_not_follow_the_model_are_not_used():
    """Silently wrong "exact" numbers (QA 2026-12-01), each right or refused now: a slope not
    broadcast with its value (5-20% off), a trace cached across a change of an attribute the
    forward reads, and an in-place op whose input is read again (the ends' check passed)."""
    torch.manual_seed(0)
    model = _Broadcast().double()
    x, b = 2 * torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    res = tk.integrated_gradients(model, x, b, target=0, rule="exact")
    assert (res.regions >= 0).all()
    torch.testing.assert_close(res.attributions, _midpoint_ig(model, x, b), rtol=0, atol=1e-4)
    flag = _Flagged().double()
    x, b = torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    tk.integrated_gradients(flag, x, b, target=0, rule="exact")
    flag.final_relu = True
    res = tk.integrated_gradients(flag, x, b, target=0, rule="exact")
    torch.testing.assert_close(res.attributions, _midpoint_ig(flag, x, b), rtol=0, atol=1e-4)
    a, out = nn.Linear(2, 2).double(), nn.Linear(2, 1).double()

    def inplace(x):  # F.relu(z, inplace=True) as a statement, z read again afterwards
        z = a(x)
        F.relu(z, inplace=True)
        return out(F.relu(z + x - 0.35))
    with pytest.warns(RuntimeWarning, match="in-place relu changes a tensor"):
        res = tk.integrated_gradients(inplace, torch.randn(2, 2, dtype=torch.float64),
                                      target=0, rule="exact")
    assert res.regions.tolist() == [[-1], [-1]]  # (every path fell back)


def test_coinciding_kinks_count_once_against_max_regions():
    """Units whose kinks fall at the same t (channels of a uniform input) were counted once
    each: a path of a few regions was refused at a cap above its count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    with torch.no_grad():  # three pairs of identical units: each kink met twice at one t
        model[0].weight[3:] = model[0].weight[:3]
        model[0].bias[3:] = model[0].bias[:3]
    x = 3 * torch.randn(4, 2, dtype=torch.float64)
    free = tk.integrated_gradients(model, x, target=0, rule="exact", max_regions=10**6)
    cap = int(free.regions.max())
    capped = tk.integrated_gradients(model, x, target=0, rule="exact", max_regions=cap)
    assert torch.equal(capped.regions, free.regions)
    with pytest.warns(RuntimeWarning, match="more than max_regions"):  # one below: over
        below = tk.integrated_gradients(model, x, target=0, rule="exact", max_regions=cap - 1)
    assert torch.equal(below.regions == -1, free.regions == cap)


def test_completeness_check_allows_the_outputs_rounding():
    """Exact sums are checked against f(x) - f(b), which rounds at the outputs' own size: a
    float32 logit of about 10 with a baseline beside the input flagged correct sums as a
    trace that did not follow the model (7 of 8 rows switched rules)."""
    torch.manual_seed(0)
    model = relu_mlp(dtype=torch.float32)
    with torch.no_grad():
        model[-1].bias += 10
    x = torch.randn(8, 6)
    b = x + 1e-3 * torch.randn(8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = tk.integrated_gradients(model, x, b, target=0, rule="exact")
    assert (res.regions >= 1).all()


def test_in_place_functions_whose_input_is_read_again_fall_back():
    lin, out = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()

    def model(x):
        h = lin(x)
        torch.relu_(h)
        return out(h) + h.sum(1, keepdim=True)
    with pytest.warns(RuntimeWarning, match="in-place relu_ changes a tensor"):
        res = tk.integrated_gradients(model, torch.randn(2, 3, dtype=torch.float64), target=0,
                                      rule="exact")
    assert res.regions.tolist() == [[-1], [-1]]  # (every path fell back)


def test_exact_sums_that_miss_completeness_take_the_adaptive_rule(monkeypatch):
    """The net under every trace that does not follow its model: sums 10% off are replaced
    (not added to) by the adaptive rule's, their regions -1, with a warning."""
    from taylor_kernels.engine import path_engine
    model, x = relu_mlp(), torch.randn(3, 6, dtype=torch.float64)
    real, calls = path_engine.integrate, []

    def off(problem, alphas, *a, **kw):
        res = real(problem, alphas, *a, **kw)
        calls.append(1)
        if len(calls) == 1:  # the exact rule's integral
            res.sums[0].mul_(1.1)
        return res
    monkeypatch.setattr(path_engine, "integrate", off)
    with pytest.warns(RuntimeWarning, match="miss completeness beyond rounding"):
        res = tk.integrated_gradients(model, x, target=0, rule="exact")
    assert (res.regions == -1).all()
    assert res.gap.abs().max() < 1e-3


def test_another_threads_probe_recorder_is_not_a_hook_that_changes_outputs():
    """A probe in progress (its global recorder, which only records the modules it sees, is
    registered process-wide) made every other thread's exact call fall back."""
    from taylor_kernels.engine import guards
    model, x = relu_mlp(), torch.randn(2, 6, dtype=torch.float64)
    with guards.modules_run({}), warnings.catch_warnings():
        warnings.simplefilter("error")
        res = tk.integrated_gradients(model, x, target=0, rule="exact")
    assert (res.regions >= 0).all()


def test_a_model_affine_in_its_input_is_one_region():
    """With no kink at all every node was skipped, the output too: "the model returned a
    NoneType"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    res = tk.integrated_gradients(model, x, target=1, rule="exact")
    want = tk.integrated_gradients(model, x, target=1, steps=4)
    torch.testing.assert_close(res.attributions, want.attributions)
    assert res.regions.tolist() == [[1]] * 3


def test_attribute_transposes_keep_their_slopes():
    """.T / .mT were read off the value: a kink downstream went unseen and the call fell
    back to the adaptive rule (regions -1)."""
    class Net(nn.Module):
        def __init__(self, how):
            super().__init__()
            torch.manual_seed(0)
            self.how, self.a, self.c = how, nn.Linear(5, 6), nn.Linear(4, 2)
            self.W = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            h = F.relu(self.a(x))
            z = (self.W @ h.mT).mT if self.how == "mT" else (self.W @ h.t()).t()
            return self.c(F.relu(z - 0.2))
    x = torch.randn(3, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = tk.integrated_gradients(Net("mT").double(), x, target=0, rule="exact")
    want = tk.integrated_gradients(Net("t").double(), x, target=0, rule="exact")
    torch.testing.assert_close(got.attributions, want.attributions)
    assert (got.regions >= 1).all()


def test_an_in_place_op_on_a_view_read_again_falls_back():
    lin, out = nn.Linear(3, 6).double(), nn.Linear(6, 1).double()

    def model(x):
        h = lin(x)
        h[:, :4].clamp_(min=0)  # changes h, read below
        return out(h)
    with pytest.warns(RuntimeWarning, match="in-place clamp_ changes a tensor"):
        res = tk.integrated_gradients(model, torch.randn(2, 3, dtype=torch.float64), target=0,
                                      rule="exact")
    assert res.regions.tolist() == [[-1], [-1]]


def test_a_forward_branching_on_a_none_argument_falls_back():
    """The trace took `mask is not None` as true, and its TypeError crashed the call."""
    lin, out = nn.Linear(4, 5).double(), nn.Linear(5, 1).double()

    def model(x, mask=None):
        h = F.relu(lin(x))
        if mask is not None:
            h = h * mask
        return out(h)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="does not run on these arguments"):
        res = tk.integrated_gradients(model, x, target=0, rule="exact",
                                      additional_forward_args=(None,))
    assert res.regions.tolist() == [[-1], [-1]]


@pytest.mark.parametrize("kw, error, match", [
    ({"rule": "adaptive", "tol": "1e-4"}, TypeError, "tol must be a number"),
    ({"rule": "exact", "max_regions": float("nan")}, ValueError, "positive integer"),
    ({"rule": "exact", "max_regions": "10"}, ValueError, "str '10'"),
    ({"rule": "exact", "max_regions": True}, ValueError, "positive integer"),
    ({"rule": "gausslegendre", "max_regions": 10}, ValueError, "no effect"),
])
def test_rule_arguments_are_checked_by_name(kw, error, match):
    with pytest.raises(error, match=match):
        tk.integrated_gradients(relu_mlp(), torch.randn(2, 6, dtype=torch.float64), target=0,
                                **kw)


def test_a_forward_reading_a_changed_module_constant_is_traced_again():
    """A cached trace read the old constant: every later call fell back (warned)."""
    import types
    mod = types.ModuleType("with_a_constant")
    exec("import torch.nn as nn, torch.nn.functional as F\nSLOPE = 0.1\n"
         "class M(nn.Module):\n"
         "    def __init__(self):\n"
         "        super().__init__(); self.a = nn.Linear(5, 8); self.c = nn.Linear(8, 2)\n"
         "    def forward(self, x):\n"
         "        return self.c(F.leaky_relu(self.a(x), SLOPE))\n", mod.__dict__)
    torch.manual_seed(0)
    model, x = mod.M().double().eval(), torch.randn(3, 5, dtype=torch.float64)
    tk.integrated_gradients(model, x, target=0, rule="exact")
    mod.SLOPE = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = tk.integrated_gradients(model, x, target=0, rule="exact")
    assert (res.regions >= 1).all() and float(res.gap.abs().max()) < 1e-12


def test_an_input_whose_one_path_passes_the_cap_reads_minus_one_on_every_path():
    """All K paths of such an input run the adaptive rule: `.regions` read [[1, -1]]."""
    net = relu_mlp(d_in=4, hidden=16)
    x = torch.randn(1, 4, dtype=torch.float64)
    bl = torch.stack([x[0] * 0.999, -3 * x[0]])[None]  # one short path, one long
    with pytest.warns(RuntimeWarning, match="max_regions"):
        res = tk.integrated_gradients(net, x, bl, target=1, rule="exact", max_regions=2)
    assert res.regions.tolist() == [[-1, -1]]


def test_out_of_memory_in_the_search_is_raised_not_a_fallback(monkeypatch):
    """The fallback for graphs that do not run caught RuntimeError, OOM included (a silent
    adaptive result, and a warning that blamed the forward)."""
    def oom(self, P, device):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(exact_path._Search, "build_cache", oom)
    with pytest.raises(torch.OutOfMemoryError):
        tk.integrated_gradients(relu_mlp(), torch.randn(2, 6, dtype=torch.float64), target=0,
                                rule="exact")


def test_a_model_without_an_exact_rule_is_traced_once_per_call(monkeypatch):
    """Any failure on a cached trace traced it again: a Softplus model paid two traces and
    two search passes on every call after the first."""
    model = relu_mlp(act=nn.Softplus)
    x = torch.randn(2, 6, dtype=torch.float64)
    traces = []
    real = exact_path.trace
    monkeypatch.setattr(exact_path, "trace", lambda *a: traces.append(a) or real(*a))
    for _ in range(3):
        with pytest.warns(RuntimeWarning, match="falling back"):
            tk.integrated_gradients(model, x, target=0, rule="exact", tol=1e-3)
    assert len(traces) == 3
