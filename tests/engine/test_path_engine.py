"""Path engine: chunking invariance, memory budgets, out-of-memory retry."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk
from taylor_kernels.engine import memory
from tests import models
from tests.conftest import requires_cuda


@pytest.mark.parametrize("rule", ["gausslegendre", "adaptive"])
def test_results_independent_of_chunk_size(rule, cpu_backend):
    model, x = models.mlp(act=torch.nn.GELU), torch.randn(6, 10, dtype=torch.float64)
    bl = 0.3 * torch.randn(6, 3, 10, dtype=torch.float64)  # 3 baselines per input
    runs = [tk.integrated_gradients(model, x, bl, target=2, steps=17, rule=rule, chunk_size=c)
            for c in (1, 7, 64, 10_000)]
    for r in runs[1:]:
        torch.testing.assert_close(r.attributions, runs[0].attributions, rtol=1e-12, atol=1e-13)
        assert r.evaluations == runs[0].evaluations


def test_budget_sets_chunk_and_result_is_same():
    model, x = models.cnn(), torch.randn(4, 2, 8, 8, dtype=torch.float64)
    whole = tk.integrated_gradients(model, x, target=0, steps=20, chunk_size=10_000)
    small = tk.integrated_gradients(model, x, target=0, steps=20, max_memory="200KB")
    torch.testing.assert_close(small.attributions, whole.attributions, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", ["eg", "sig", "ig_k"])
def test_budget_bounds_the_endpoint_forwards(method):
    """The no-grad forwards at the inputs and at every reference (expected gradients' samples,
    SIG's coalitions, K baselines) come in rows the budget holds (they ran 256 rows at once,
    up to 12x a small budget), and the result is the default budget's."""
    model, x = models.cnn(), torch.randn(4, 2, 8, 8, dtype=torch.float64)
    background = torch.randn(16, 2, 8, 8, dtype=torch.float64)
    calls = {
        "eg": lambda **kw: tk.expected_gradients(model, x, background, target=0, samples=48,
                                                  seed=0, **kw),
        "sig": lambda **kw: tk.shapley_integrated_gradients(model, x, 0.0, target=0,
                                                            coalitions=48, seed=0, steps=4, **kw),
        "ig_k": lambda **kw: tk.integrated_gradients(
            model, x, 0.1 * torch.randn(1, 48, 2, 8, 8, dtype=torch.float64, generator=
                                        torch.Generator().manual_seed(2)), target=0, steps=4,
            **kw)}
    whole = calls[method]()
    rows: list[int] = []
    hook = model.register_forward_hook(
        lambda m, i, o: rows.append(i[0].shape[0]) if not torch.is_grad_enabled() else None)
    try:
        small = calls[method](max_memory="400KB")
    finally:
        hook.remove()
    torch.testing.assert_close(small.attributions, whole.attributions, rtol=1e-10, atol=1e-12)
    assert rows and max(rows) < 4 * 49  # the 196 rows of the endpoints were one forward


def test_endpoint_rows_fit_what_the_budget_leaves_beside_the_references(monkeypatch):
    """The endpoint forwards' rows fit the budget less what the call holds (inputs and
    references; on the CPU also ``CPU_CALL_RESERVE``): expected gradients' 64 references of
    a CNN input held 6.3 MB of an 8 MB budget, and the endpoint rows were sized for all 8 MB
    (a resident peak of 2.2x the budget)."""
    from taylor_kernels.engine import path_engine, reference_groups
    model, x = models.mlp(), torch.randn(2, 10, dtype=torch.float64)
    background = torch.randn(16, 10, dtype=torch.float64)
    monkeypatch.setattr(path_engine, "_endpoint_row_bytes", lambda problem, n, left: 1000.0)
    monkeypatch.setattr(reference_groups, "REFERENCE_SHARE", 1.0)  # all 40 in one group
    held = x.nbytes + 2 * 40 * x[0].nbytes  # inputs and the B x 40 drawn references
    budget = held + 8000
    rows: list[int] = []
    hook = model.register_forward_hook(
        lambda m, i, o: rows.append(i[0].shape[0]) if not torch.is_grad_enabled() else None)
    try:
        tk.expected_gradients(model, x, background, target=0, samples=40, seed=0,
                              max_memory=budget)
    finally:
        hook.remove()
    left = 8000 - min(memory.CPU_CALL_RESERVE, budget // 8)
    per_row = 1000 * path_engine.ENDPOINT_MARGIN
    assert max(rows) == left // per_row  # (the whole budget held 14 rows per forward)


def test_a_budget_the_baselines_fill_raises_before_any_forward_of_them():
    """The caller's own ``K = 400`` baselines per input fill the budget (drawn references are
    built in groups instead: tests/engine/test_reference_groups.py)."""
    model, x = models.mlp(), torch.randn(2, 10, dtype=torch.float64)
    baselines = torch.randn(2, 400, 10, dtype=torch.float64)
    rows: list[int] = []
    hook = model.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        with pytest.raises(MemoryError, match="leaves nothing for the path"):
            tk.integrated_gradients(model, x, baselines, target=0, steps=4,
                                    max_memory=baselines.nbytes)
    finally:
        hook.remove()
    assert max(rows, default=0) <= 2  # no forward of the 802 endpoint rows


def test_drawn_references_that_would_fill_the_budget_run_in_groups():
    """EG's 400 references per input held at once would fill the budget (it raised): in
    groups the call runs and equals the unlimited one."""
    model, x = models.mlp(), torch.randn(2, 10, dtype=torch.float64)
    background = torch.randn(16, 10, dtype=torch.float64)
    kw = dict(target=0, samples=400, seed=0)
    small = tk.expected_gradients(model, x, background, max_memory=2 * 400 * x[0].nbytes, **kw)
    whole = tk.expected_gradients(model, x, background, **kw)
    torch.testing.assert_close(small.attributions, whole.attributions, rtol=1e-10, atol=1e-12)


def test_measured_endpoint_forward_leaves_check_r_to_the_no_grad_forwards():
    """The budget's measuring forward runs with grad on the CPU; check R must not compare it
    with row 0's no-grad output: nn.TransformerEncoder takes its fast path (padded positions
    output 0) only without grad, and a false "mixes rows" error came from it."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 1)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x, pad):
            return self.head(self.enc(x, src_key_padding_mask=pad).mean(1))

    net, x = Net().eval(), torch.randn(3, 5, 16)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[:, -2:] = True
    free = tk.integrated_gradients(net, x, target=0, additional_forward_args=(pad,), steps=8)
    capped = tk.integrated_gradients(net, x, target=0, additional_forward_args=(pad,), steps=8,
                                     max_memory="64MB")
    torch.testing.assert_close(capped.attributions, free.attributions)


def test_chunk_size_follows_measured_cost():
    from taylor_kernels.engine.path_engine import integrate
    from taylor_kernels.engine.problem import make_problem
    from taylor_kernels.engine.quadrature import nodes_and_weights
    model, x = models.mlp(d_in=50, hidden=64), torch.randn(32, 50, dtype=torch.float64)
    problem = make_problem(model, x, target=0)
    t, w = nodes_and_weights("gausslegendre", 50)
    big = integrate(problem, t, [w], max_memory="4MB").chunk_size
    tiny = integrate(problem, t, [w], max_memory="256KB").chunk_size
    assert 1 <= tiny < big < 1600
    assert big / tiny == pytest.approx(16, rel=0.35)  # chunk scales with the budget


def test_measured_point_cost_is_reusable():
    """A second call given the first call's point cost skips the probes, same chunks/result."""
    from taylor_kernels.engine.path_engine import integrate
    from taylor_kernels.engine.problem import make_problem
    from taylor_kernels.engine.quadrature import nodes_and_weights
    model, x = models.mlp(d_in=50, hidden=64), torch.randn(32, 50, dtype=torch.float64)
    problem = make_problem(model, x, target=0)
    t, w = nodes_and_weights("gausslegendre", 50)
    first = integrate(problem, t, [w], max_memory="1MB")
    again = integrate(problem, t, [w], max_memory="1MB", point_cost=first.point_cost)
    assert first.point_cost > 0 and again.chunk_size == first.chunk_size < 1600
    torch.testing.assert_close(again.sums[0], first.sums[0], rtol=1e-12, atol=1e-13)


def test_budget_too_small_for_one_point():
    model, x = models.mlp(), torch.randn(2, 10, dtype=torch.float64)
    with pytest.raises(MemoryError, match="max_memory of 16 bytes leaves nothing"):
        tk.integrated_gradients(model, x, target=0, steps=5, max_memory=16)


def test_default_limit_lets_a_costly_point_run(monkeypatch):
    """A model whose one point exceeds the *default* limit still runs, one point per chunk;
    chunks hold at least ``DEFAULT_MIN_POINTS`` points otherwise."""
    from taylor_kernels.engine.path_engine import integrate
    from taylor_kernels.engine.problem import make_problem
    from taylor_kernels.engine.quadrature import nodes_and_weights
    monkeypatch.setattr(memory, "DEFAULT_FREE_FRACTION", 1e-12)
    monkeypatch.setattr(memory, "DEFAULT_MIN_POINTS", 1)
    model, x = models.mlp(), torch.randn(2, 10, dtype=torch.float64)
    t, w = nodes_and_weights("gausslegendre", 5)
    res = integrate(make_problem(model, x, target=0), t, [w])
    assert res.chunk_size == 1
    monkeypatch.setattr(memory, "DEFAULT_MIN_POINTS", 4)  # the floor of a default limit
    assert integrate(make_problem(models.mlp(), x, target=0), t, [w]).chunk_size == 4
    whole = tk.integrated_gradients(model, x, target=0, steps=5, chunk_size=100)
    torch.testing.assert_close(res.sums[0], whole.attributions, rtol=1e-12, atol=1e-14)


class OOMAbove(torch.nn.Module):
    """Raises torch.OutOfMemoryError when asked for more than ``limit`` rows at once."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.sizes = inner, limit, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return self.inner(x)


def test_out_of_memory_halves_and_retries():
    inner, x = models.mlp(), torch.randn(4, 10, dtype=torch.float64)
    model = OOMAbove(inner, limit=13)
    got = tk.integrated_gradients(model, x, target=1, steps=25, chunk_size=100)
    want = tk.integrated_gradients(inner, x, target=1, steps=25, chunk_size=100)
    torch.testing.assert_close(got.attributions, want.attributions, rtol=1e-12, atol=1e-13)
    assert 100 in model.sizes and max(s for s in model.sizes if s <= 13) == 12


def test_oom_on_single_point_is_raised():
    model = OOMAbove(models.mlp(), limit=0)
    with pytest.raises(torch.OutOfMemoryError):
        tk.integrated_gradients(model, torch.randn(4, 10, dtype=torch.float64), target=1,
                                steps=5, chunk_size=8)


@pytest.mark.parametrize("text,expected", [("512MB", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)),
                                           (1000, 1000)])
def test_parse_budget(text, expected):
    assert memory.parse_budget(text, torch.device("cpu")) == expected


@pytest.mark.parametrize("bad", ["lots", -5, 0, "1.2.3GB", "nan", "inf", "5XB", "-1MB",
                                 float("nan"), float("inf"), True, [1]])
def test_parse_budget_rejects(bad):
    with pytest.raises(ValueError, match="max_memory must be a finite positive number"):
        memory.parse_budget(bad, torch.device("cpu"))


def test_bad_max_memory_reaches_the_user_as_one_value_error():
    model, x = models.mlp(), torch.randn(2, 10, dtype=torch.float64)
    for bad in ("nan", float("inf"), "12 parsecs"):
        with pytest.raises(ValueError, match="max_memory must be"):
            tk.integrated_gradients(model, x, target=0, steps=5, max_memory=bad)


def test_progress_bar_runs(capsys):
    model, x = models.mlp(), torch.randn(3, 10, dtype=torch.float64)
    tk.integrated_gradients(model, x, target=0, steps=8, chunk_size=5, progress=True)
    assert "path points" in capsys.readouterr().err


class _MultiTarget:
    """A problem whose forward returns ``T`` outputs per point (columns ``cols`` of the model)."""

    def __init__(self, model, x, cols, baselines=None):
        from taylor_kernels.engine.problem import make_problem
        self.inner = make_problem(model, x, baselines, target=0)
        self.x, self.baselines, self.cols = self.inner.x, self.inner.baselines, list(cols)
        self.B, self.K, self.model = self.inner.B, self.inner.K, model
        self.cache_key = (len(self.cols),)  # the cost per point depends on T

    def forward(self, pts, rows):
        return self.model(pts)[:, self.cols]


class _DataDependentBackward(torch.autograd.Function):
    """Identity whose backward branches on a value: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, z):
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        return g if float(g.abs().sum()) >= 0 else -g


def _multi_vs_single(model, x, dtype_tol, chunk_sizes, baselines=None, cols=(0, 2, 1)):
    from taylor_kernels.engine.path_engine import integrate
    from taylor_kernels.engine.quadrature import nodes_and_weights
    t, w = nodes_and_weights("gausslegendre", 11)
    multi = _MultiTarget(model, x, cols, baselines)
    singles = [integrate(_MultiTarget(model, x, [c], baselines), t, [w, w * t], chunk_size=5)
               for c in cols]
    for chunk in chunk_sizes:
        res = integrate(multi, t, [w, w * t], chunk_size=chunk)
        for i in range(2):
            assert res.sums[i].shape == (len(cols),) + tuple(multi.x.shape)
            for j, single in enumerate(singles):
                torch.testing.assert_close(res.sums[i][j], single.sums[i][0], rtol=dtype_tol,
                                           atol=dtype_tol)
    return multi


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_multi_target_equals_single_targets_and_is_chunk_invariant(dtype, tol):
    model, x = models.mlp(d_out=4, dtype=dtype), torch.randn(3, 10, dtype=dtype)
    bl = 0.2 * torch.randn(3, 2, 10, dtype=dtype)
    multi = _multi_vs_single(model, x, tol, (1, 4, 13, 10_000, None), baselines=bl)
    assert not getattr(multi, "serial_backward", False)  # the batched backward ran


def test_multi_target_falls_back_to_serial_backward_once():
    inner = models.mlp(d_out=4)
    model = lambda z: inner(_DataDependentBackward.apply(z))  # noqa: E731
    x = torch.randn(2, 10, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="cannot run under vmap") as caught:
        multi = _multi_vs_single(model, x, 1e-12, (3, 7))
    assert multi.serial_backward is True
    assert sum("cannot run under vmap" in str(w.message) for w in caught) == 1


def test_multi_target_endpoint_values_and_probe_cost():
    from taylor_kernels.engine.path_engine import endpoint_values, integrate
    from taylor_kernels.engine.quadrature import nodes_and_weights
    model, x = models.mlp(d_in=30, hidden=64, d_out=8), torch.randn(4, 30, dtype=torch.float64)
    bl = torch.randn(4, 3, 30, dtype=torch.float64)
    multi = _MultiTarget(model, x, range(8), bl)
    fx, fb = endpoint_values(multi)
    assert fx.shape == (4, 8) and fb.shape == (4, 3, 8)
    torch.testing.assert_close(fx, model(x))
    torch.testing.assert_close(fb[:, 1], model(bl[:, 1]))
    t, w = nodes_and_weights("gausslegendre", 20)
    one = integrate(_MultiTarget(model, x, [0], bl), t, [w], max_memory="1MB")
    eight = integrate(multi, t, [w], max_memory="1MB")
    # T = 8 batched gradients: (1 + 8) saved + (4 + 8) points vs 2 saved + 5 points
    assert eight.point_cost > 3 * one.point_cost
    assert eight.chunk_size < one.chunk_size
    serial = _MultiTarget(model, x, range(8), bl)
    serial.serial_backward = True  # 8 passes, one gradient through the graph at a time
    serial.cache_key = (8, "serial")  # its own measured cost, not the batched one's
    passes = integrate(serial, t, [w], max_memory="1MB")
    assert one.point_cost < passes.point_cost < eight.point_cost
    torch.testing.assert_close(passes.sums[0], eight.sums[0])


def test_cpu_point_cost_formula():
    c = memory.CPU_TRANSIENT_FACTOR
    assert memory.cpu_point_cost(100, 10) == c * (2 * 100 + 5 * 10)
    assert memory.cpu_point_cost(100, 10, 8) == c * (9 * 100 + 12 * 10)
    assert memory.cpu_point_cost(100, 10, 8, batched=False) == c * (2 * 100 + 12 * 10)


def test_deferred_non_finite_check_names_the_node(monkeypatch):
    """The CUDA route (one device flag per chunk, read after the loop) on the CPU: the same
    error, the same node; finite results unchanged."""
    from taylor_kernels.engine import path_engine
    monkeypatch.setattr(path_engine, "_defer_checks", lambda device: True)
    f = lambda z: torch.sqrt(z.abs()).sum(1)  # noqa: E731  (infinite slope at 0)
    x = torch.ones(2, 4, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"input 0, baseline 0, alpha=0 "):
        tk.integrated_gradients(f, x, rule="riemann_left", steps=4, chunk_size=3)
    model, x = models.mlp(), torch.randn(3, 10, dtype=torch.float64)
    got = tk.integrated_gradients(model, x, target=1, steps=9, chunk_size=4)
    monkeypatch.setattr(path_engine, "_defer_checks", lambda device: False)
    want = tk.integrated_gradients(model, x, target=1, steps=9, chunk_size=4)
    torch.testing.assert_close(got.attributions, want.attributions, rtol=0, atol=0)


@requires_cuda
def test_cuda_run_keeps_peak_statistic_and_defers_checks():
    """On CUDA: the probes leave the caller's peak statistic as it was, and a NaN gradient is
    still reported with its node after the (sync-free) loop."""
    dev = torch.device("cuda")
    model, x = models.mlp().to(dev), torch.randn(4, 10, dtype=torch.float64, device=dev)
    big = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)
    del big
    peak = torch.cuda.max_memory_allocated(dev)
    res = tk.integrated_gradients(model, x, target=0, steps=16)
    assert torch.cuda.max_memory_allocated(dev) == peak
    want = tk.integrated_gradients(model.cpu(), x.cpu(), target=0, steps=16, chunk_size=1000)
    torch.testing.assert_close(res.attributions.cpu(), want.attributions, rtol=1e-10, atol=1e-12)
    f = lambda z: torch.sqrt(z.abs()).sum(1)  # noqa: E731
    with pytest.raises(FloatingPointError, match="input 0, baseline 0, alpha=0 "):
        tk.integrated_gradients(f, torch.ones(2, 4, device=dev, dtype=torch.float64),
                                rule="riemann_left", steps=4, chunk_size=3)


class _GradCalls(torch.nn.Module):
    """A tanh MLP counting its forwards that build a graph (the engine's path chunks)."""

    def __init__(self):
        super().__init__()
        self.net = models.mlp(act=torch.nn.Tanh)
        self.passes = 0

    def forward(self, x):
        self.passes += torch.is_grad_enabled()
        return self.net(x)


def test_adaptive_first_pass_covers_the_levels_the_last_call_needed():
    """A second adaptive call on the same model and shape evaluates, in its first pass, every
    level the first call needed for all inputs: fewer passes, the same levels and results."""
    torch.manual_seed(0)
    model, x = _GradCalls(), torch.randn(3, 10, dtype=torch.float64)
    first = tk.integrated_gradients(model, x, target=2, rule="adaptive", tol=1e-9)
    passes, model.passes = model.passes, 0
    again = tk.integrated_gradients(model, x, target=2, rule="adaptive", tol=1e-9)
    assert int(first.nodes_per_input.min()) >= 7  # it needed levels beyond the first two
    assert model.passes < passes
    assert torch.equal(again.nodes_per_input, first.nodes_per_input)
    torch.testing.assert_close(again.attributions, first.attributions, rtol=1e-12, atol=1e-14)
    other_tol = tk.integrated_gradients(model, x, target=2, rule="adaptive", tol=1e-2)
    assert int(other_tol.nodes_per_input.min()) <= int(first.nodes_per_input.min())
