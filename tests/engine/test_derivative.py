"""Derivative engine: HVPs, Hessian rows, diagonals and D^3 f against torch.func in float64."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import hessian as func_hessian
from torch.func import jacfwd, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import taylor_kernels as tk
from taylor_kernels.engine import derivative as d
from taylor_kernels.engine import memory

TOL = 1e-10


def _mlp(D=5, H=7):
    return torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, H),
                               torch.nn.Softplus(), torch.nn.Linear(H, 1)).double()


def _f(net):
    return lambda z: net(z.reshape(z.shape[0], -1)).squeeze(-1)


def _true_hessian(net, x):
    one = lambda z: net(z.reshape(1, -1)).squeeze()  # noqa: E731
    return vmap(func_hessian(one))(x.reshape(x.shape[0], -1)).detach()


def test_hvp_matches_torch_func():
    net = _mlp()
    x, V = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    H = _true_hessian(net, x)
    out = d.hvp(_f(net), x, V)
    assert out.shape == (3, 4, 5)
    assert (out - torch.einsum("bij,bmj->bmi", H, V)).abs().max() < TOL
    one = d.hvp(_f(net), x, V[:, 0])  # a direction shaped like x
    assert (one - out[:, 0]).abs().max() < TOL


def test_hessian_full_rows_and_multidim_features():
    net = _mlp(D=6)
    x = torch.randn(2, 2, 3, dtype=torch.float64)  # features [2, 3] flatten to D = 6
    H = _true_hessian(net, x)
    assert (d.hessian(_f(net), x) - H).abs().max() < TOL
    rows = d.hessian(_f(net), x, index=[4, 1])
    assert rows.shape == (2, 2, 6) and (rows - H[:, [4, 1]]).abs().max() < TOL


@pytest.mark.parametrize("chunk", [1, 2, 7, 100])
def test_chunking_does_not_change_results(chunk):
    net = _mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    H = _true_hessian(net, x)
    assert (d.hessian(_f(net), x, chunk_size=chunk) - H).abs().max() < TOL


def test_small_memory_budget_splits_but_agrees():
    net = _mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    cost = d.pair_cost(_f(net), x)
    per_pair, fixed = cost.per_pair, int(cost.fixed)
    assert per_pair > 0 and fixed >= 0
    assert d.plan(4, 5, cost, fixed + int(per_pair * 2.5)) == (2, 1)
    assert d.plan(4, 5, cost, fixed + int(per_pair * 10)) == (4, 2)
    out = d.hessian(_f(net), x, max_memory=fixed + int(per_pair * 2.5))
    assert (out - _true_hessian(net, x)).abs().max() < TOL
    with pytest.raises(MemoryError, match="max_memory"):  # one pair and the fixed part
        d.hessian(_f(net), x, max_memory=int((fixed + per_pair) / 2))


def test_the_result_and_directions_count_against_the_budget(monkeypatch):
    """hessian's [B, R, D] result and its one-hot directions are held beside the chunks (a
    784-wide MLP's 2.4 MB Hessian ran at 2.5x a 4 MB budget): what they leave is what the
    chunk plan gets, and a budget they fill raises before any product."""
    net = _mlp(D=6)
    x = torch.randn(3, 6, dtype=torch.float64)
    held = 3 * 6 * 6 * 8 + 6 * 6 * 8  # result [3, 6, 6] and directions [6, 6], float64
    seen = []
    real_plan = d.plan
    monkeypatch.setattr(d, "plan", lambda B, M, cost, budget: seen.append(budget)
                        or real_plan(B, M, cost, budget))
    cost = d.pair_cost(_f(net), x)
    budget = held + int(cost.fixed + 4 * cost.per_pair)
    out = d.hessian(_f(net), x, max_memory=budget)
    # the chunks take memory.CPU_CHUNK_SHARE of what is left (glibc keeps freed chunks)
    assert seen == [max(int((budget - held) * memory.CPU_CHUNK_SHARE),
                        math.ceil(cost.per_pair) + math.ceil(cost.fixed))]
    assert (out - _true_hessian(net, x)).abs().max() < TOL
    with pytest.raises(MemoryError, match="cannot hold the call's result and directions"):
        d.hessian(_f(net), x, max_memory=held)


def test_hessian_block_holds_its_result_once_within_the_budget():
    """hessian_block's [B, M, N] result is counted beside the chunks and written in place (a
    parts list and two cats held it three times, uncounted: 7x an 8 MB budget)."""
    net = _mlp(D=6)
    x = torch.randn(3, 6, dtype=torch.float64)
    U, W = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64)
    want = torch.einsum("bnd,bde,bme->bmn", W, _true_hessian(net, x), U)
    result = 3 * 4 * 5 * 8
    held = U.nbytes + W.nbytes
    with pytest.raises(MemoryError, match="cannot hold the call's result and directions"):
        d.hessian_block(_f(net), x, U, W, max_memory=held + result - 1)
    for kw in ({"chunk_size": 2}, {"max_memory": 1 << 20}, {}):
        torch.testing.assert_close(d.hessian_block(_f(net), x, U, W, **kw), want)


def test_hessian_block_takes_directions_of_another_float_dtype_as_hvp_does():
    net = _mlp(D=6)  # (float32 U or W for float64 x raised torch's dtype error)
    x = torch.randn(3, 6, dtype=torch.float64)
    U, W = torch.randn(3, 4, 6), torch.randn(3, 5, 6)
    want = torch.einsum("bnd,bde,bme->bmn", W.double(), _true_hessian(net, x), U.double())
    got = d.hessian_block(_f(net), x, U, W)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)


def test_chunk_size_and_max_memory_are_exclusive_and_both_checked():
    """A fixed chunk_size silently dropped max_memory (even a malformed one)."""
    net, x = _mlp(), torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="not both"):
        d.hessian(_f(net), x, chunk_size=2, max_memory="1GB")
    with pytest.raises(ValueError, match="max_memory must be"):
        d.hessian(_f(net), x, chunk_size=2, max_memory="abc")
    with pytest.raises(ValueError, match="not both"):
        tk.integrated_gradients(net, x, chunk_size=4, max_memory="1GB")
    with pytest.raises(ValueError, match="max_memory must be"):
        tk.integrated_hessians(net, x, chunk_size=4, max_memory=-1)


def test_hessian_diagonal_exact_and_hutchinson():
    net = _mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    diag = torch.diagonal(_true_hessian(net, x), dim1=1, dim2=2)
    assert (d.hessian_diagonal(_f(net), x, chunk_size=3) - diag).abs().max() < TOL
    a = d.hessian_diagonal(_f(net), x, "hutchinson", samples=4000, seed=1)
    b = d.hessian_diagonal(_f(net), x, "hutchinson", samples=4000, seed=1)
    assert torch.equal(a, b)  # seeded
    H = _true_hessian(net, x)
    off = (H.pow(2).sum(2) - diag.pow(2)).sqrt()  # per-feature std of one sample
    assert ((a - diag).abs() <= 5 * off / 4000 ** 0.5 + 1e-12).all()


def test_third_order_matches_jacfwd_of_hessian():
    net = _mlp()
    x, u, v = torch.randn(3, 3, 5, dtype=torch.float64)
    one = lambda z: net(z.reshape(1, -1)).squeeze()  # noqa: E731
    T = vmap(jacfwd(func_hessian(one)))(x).detach()
    out = d.third_order(_f(net), x, u, v)
    assert (out - torch.einsum("bijk,bi,bj->bk", T, u, v)).abs().max() < TOL


class _LegacySquare(torch.autograd.Function):
    """An autograd.Function without setup_context: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return 2 * a * g


def test_fallback_to_double_backward_warns_once_and_is_correct(monkeypatch):
    net = _mlp()
    x, V = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    d._warned.clear()
    legacy = lambda z: _LegacySquare.apply(net(z).squeeze(-1))  # noqa: E731
    H = vmap(func_hessian(lambda z: net(z.reshape(1, -1)).squeeze() ** 2))(x).detach()
    out = d.hvp(legacy, x, V, chunk_size=3)  # reverse-over-reverse handles it, no fallback
    assert (out - torch.einsum("bij,bmj->bmi", H, V)).abs().max() < TOL


    def unbatchable(*args):  # what autograd raises when a backward op has no batching rule
        error = RuntimeError("vmap: batching rule not implemented for aten::some_op")
        raise d.BatchingFailed(error) from error

    with monkeypatch.context() as mp:
        mp.setattr(d, "_batched", unbatchable)
        with pytest.warns(RuntimeWarning, match="double backward"):
            out = d.hvp(legacy, x, V, chunk_size=3)
        assert (out - torch.einsum("bij,bmj->bmi", H, V)).abs().max() < TOL
        for size in (6, None):  # whole points: the fallback loops over the 3 directions
            out = d.hvp(legacy, x, V, chunk_size=size)
            assert (out - torch.einsum("bij,bmj->bmi", H, V)).abs().max() < TOL
    T = vmap(jacfwd(func_hessian(lambda z: net(z.reshape(1, -1)).squeeze() ** 2)))(x).detach()
    u, v = torch.randn(2, 2, 5, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="triple backward"):
        out3 = d.third_order(legacy, x, u, v)
    assert (out3 - torch.einsum("bijk,bi,bj->bk", T, u, v)).abs().max() < TOL


def test_attention_model_uses_math_backend():
    torch.manual_seed(1)
    proj = torch.nn.Linear(4, 12).double()

    def f(z):  # z [B, 3 tokens, 4]
        q, k, v = proj(z).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).sum((1, 2))

    x = torch.randn(2, 3, 4, dtype=torch.float64)
    one = lambda z: f(z.reshape(1, 3, 4)).squeeze()  # noqa: E731
    # the reference on the math backend: torch 2.14's fused CPU kernel has no forward AD
    with sdpa_kernel(SDPBackend.MATH):
        H = vmap(func_hessian(one))(x.reshape(2, 12)).detach()
    assert (d.hessian(f, x) - H).abs().max() < TOL


def test_errors_are_actionable():
    net = _mlp()
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="one scalar per row"):
        d.hvp(lambda z: z, x, x)
    with pytest.raises(ValueError, match="shaped like x"):
        d.hvp(_f(net), x, torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="index"):
        d.hessian(_f(net), x, index=[5])
    with pytest.raises(ValueError, match="method"):
        d.hessian_diagonal(_f(net), x, method="bogus")
    with pytest.raises(TypeError, match="floating"):
        d.hessian(_f(net), torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        d.hvp(_f(net), x, x, chunk_size=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_and_directions_raise(bad):
    net = _mlp()
    x = torch.randn(2, 5, dtype=torch.float64)
    y = x.clone()
    y[1, 2] = bad
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        d.hvp(_f(net), y, x)
    with pytest.raises(ValueError, match="v contains NaN or Inf"):
        d.hvp(_f(net), x, y)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        d.hessian(_f(net), y)
    with pytest.raises(ValueError, match="u contains NaN or Inf"):
        d.third_order(_f(net), x, y, x)


def test_zero_directions_raise_and_zero_vectors_give_zero():
    net = _mlp()
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="zero directions"):
        d.hvp(_f(net), x, torch.empty(2, 0, 5, dtype=torch.float64))
    assert d.hvp(_f(net), x, torch.zeros_like(x)).abs().max() == 0  # H 0 = 0: not an error


def test_inference_mode_and_train_mode_batch_norm_are_refused():
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4),
                              torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    f = _f(net)
    stats = net[1].num_batches_tracked.clone()
    with pytest.raises(ValueError, match="BatchNorm1d.*model.eval"):
        d.hvp(f, x, x)
    assert net[1].num_batches_tracked == stats
    net.eval()
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            d.hvp(f, x, x)
    assert d.hvp(f, x, x).shape == x.shape


class _DoublesItsInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, x):
        x.mul_(2.0)
        return torch.tanh(self.lin(x))


def test_a_model_changing_its_input_in_place_is_named_and_the_input_kept():
    """The function-based APIs blamed randomness (dropout) and doubled the caller's x."""
    import taylor_kernels as tk
    torch.manual_seed(0)
    m = _DoublesItsInput().double().eval()
    x0 = torch.randn(2, 6, dtype=torch.float64)
    f = lambda z: m(z)[:, 1]  # noqa: E731
    for call in (lambda x: tk.hessian(f, x), lambda x: tk.hvp(f, x, torch.ones_like(x)),
                 lambda x: tk.third_order(f, x, x, x),
                 lambda x: tk.jet(m, x, torch.ones_like(x), 2, target=1)):
        x = x0.clone()
        with pytest.raises(ValueError, match="changes its input in place"):
            call(x)
        assert torch.equal(x, x0)


def test_diagonal_directions_are_built_per_chunk():
    """The exact diagonal's D x D one-hot directions and Hutchinson's [B, M, D] vectors were
    held whole (a 784-wide MLP's exact diagonal could not run at 4 MB; 64 samples of a CNN
    input took 6.3 MB of 8 MB, and the chunks' sums were kept to the end): built per chunk,
    Hutchinson from one generator per sample, so a seed gives the same estimate however the
    call is chunked."""
    net = _mlp(D=7)
    x = torch.randn(3, 7, dtype=torch.float64)
    exact = d.hessian_diagonal(_f(net), x, chunk_size=2)
    want = torch.diagonal(_true_hessian(net, x), dim1=1, dim2=2)
    assert (exact - want).abs().max() < TOL
    kw = dict(method="hutchinson", samples=40, seed=3)
    one = d.hessian_diagonal(_f(net), x, chunk_size=1, **kw)
    for other in (d.hessian_diagonal(_f(net), x, chunk_size=7, **kw),
                  d.hessian_diagonal(_f(net), x, **kw)):
        torch.testing.assert_close(other, one, rtol=1e-12, atol=1e-14)
    many = d.hessian_diagonal(_f(net), x, method="hutchinson", samples=4000, seed=0)
    assert (many - want).abs().max() < 0.15 * want.abs().max()  # unbiased: converges


def test_hutchinson_vectors_depend_on_the_seed_and_rows_not_on_the_chunks():
    """Each row's vectors are its own (row chunks reused row 0's when the chunk cache missed
    the rows) and each seed draws others (a hash without the drawn key ignored the seed)."""
    net = _mlp(D=6)
    x = torch.randn(4, 6, dtype=torch.float64)
    kw = dict(method="hutchinson", samples=1)
    whole = d.hessian_diagonal(_f(net), x, seed=3, **kw)
    torch.testing.assert_close(d.hessian_diagonal(_f(net), x, seed=3, chunk_size=1, **kw),
                               whole, rtol=1e-12, atol=1e-14)
    assert not torch.equal(d.hessian_diagonal(_f(net), x, seed=4, **kw), whole)
    same = torch.zeros(4, 6, dtype=torch.float64) + x[:1]  # every row the same point
    one = d.hessian_diagonal(_f(net), same, seed=3, **kw)
    assert not torch.equal(one[0], one[1])  # different rows, different vectors


def test_non_finite_hessian_vector_products_raise():
    """A Hessian that is NaN where the gradient is finite (|z|^1.5 at 0: the second
    derivative 0.75 |z|^-0.5 times 0) came back silently."""
    x = torch.randn(2, 3, dtype=torch.float64)
    x[0, 1] = 0.0
    with pytest.raises(FloatingPointError, match="Hessian-vector"):
        d.hessian(lambda z: z.abs().pow(1.5).sum(1), x)


def test_second_order_on_group_norm_falls_back_from_a_wrong_batched_backward():
    """vmap's batching of group norm's double backward raised a shape mismatch (torch 2.13),
    which no functorch keyword named: every second-order API crashed on GroupNorm models."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.GroupNorm(2, 4),
                                torch.nn.SiLU(), torch.nn.Flatten(),
                                torch.nn.Linear(64, 3)).double().eval()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    want = torch.stack([func_hessian(lambda v: model(v.view(1, 2, 4, 4))[0, 1])(r.reshape(-1))
                        for r in x])
    got = tk.hessian(lambda z: model(z)[:, 1], x)
    torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-10, atol=1e-12)


def test_group_norm_over_positions_is_not_batched_wrongly():
    """With more than one position per channel, vmap's batched double backward of group norm
    raised nothing and was 1.45 off (entries up to 3.5): every Hessian, interaction and HVP
    of a GroupNorm model silently wrong. Group norms now run composite in the forward."""
    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(2, 4).double()
    w = torch.randn(8, dtype=torch.float64)

    def f(z):
        return (torch.tanh(gn(z.reshape(-1, 4, 2))).reshape(-1, 8) * w).sum(1)

    x = torch.randn(2, 8, dtype=torch.float64)  # (two rows: no error, wrong numbers)
    want = torch.stack([func_hessian(lambda v: f(v[None])[0])(r) for r in x])
    torch.testing.assert_close(tk.hessian(f, x), want, rtol=1e-10, atol=1e-12)
    V = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(tk.hvp(f, x, V), torch.einsum("bij,bmj->bmi", want, V),
                               rtol=1e-10, atol=1e-12)
    fn = torch.nn.functional.group_norm
    torch.testing.assert_close(tk.hessian(lambda z: (torch.tanh(fn(z.reshape(-1, 4, 2), 2))
                                                     .reshape(-1, 8) * w).sum(1), x),
                               torch.stack([func_hessian(lambda v: (torch.tanh(fn(
                                   v.reshape(1, 4, 2), 2)).reshape(-1) * w).sum())(r)
                                   for r in x]), rtol=1e-10, atol=1e-12)


def test_an_error_of_the_model_itself_is_not_taken_for_a_batching_failure():
    """Only the batched second backward's failure falls back: a model's own error (here a
    shape bug) raises from its one forward, without a second try or a warning."""
    calls = []

    def broken(z):
        calls.append(1)
        return (z @ torch.ones(3, 2, dtype=z.dtype)).sum(1)  # [B, 5] @ [3, 2]: a shape bug

    x, V = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="shapes"):
            d.grad_and_hvp(broken, x, V)
    assert len(calls) == 1


@pytest.mark.parametrize("api", ["hessian", "hvp", "integrated_hessians"])
def test_a_gradient_constant_in_x_gives_a_zero_hessian(api):
    """The memory probe's double backward crashed where the gradient does not depend on x
    (a frozen linear model); the chunked path already gave zeros."""
    lin = torch.nn.Linear(4, 2).requires_grad_(False)
    x = torch.randn(3, 4)
    calls = {"hessian": lambda: tk.hessian(lambda z: lin(z)[:, 0], x),
             "hvp": lambda: tk.hvp(lambda z: z.sum(1), x, torch.randn(3, 2, 4)),
             "integrated_hessians": lambda: tk.integrated_hessians(lin, x, target=0,
                                                                   steps=4).interactions}
    got = calls[api]()
    if api == "integrated_hessians":  # no interaction: the diagonal holds IG
        ig = tk.integrated_gradients(lin, x, target=0, steps=4).attributions
        torch.testing.assert_close(got.diagonal(dim1=1, dim2=2), ig)
        got = got - torch.diag_embed(got.diagonal(dim1=1, dim2=2))
    assert float(got.abs().max()) == 0.0


@pytest.mark.parametrize("api", ["hessian", "hvp", "integrated_hessians"])
def test_an_output_that_does_not_reach_x_is_refused_as_by_ig(api):
    """``model(z.detach())``: autograd's "not used in the graph" came out raw, where IG names
    the cause."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    x = torch.randn(3, 4)
    calls = {"hessian": lambda: tk.hessian(lambda z: net(z.detach())[:, 0], x),
             "hvp": lambda: tk.hvp(lambda z: net(z.detach())[:, 0], x, torch.randn(3, 1, 4)),
             "integrated_hessians": lambda: tk.integrated_hessians(
                 lambda z: net(z.detach()), x, target=0, steps=4)}
    with pytest.raises(ValueError, match="no gradient path"):
        calls[api]()
    with pytest.raises(ValueError, match="no gradient path"):
        tk.integrated_gradients(lambda z: net(z.detach()), x, target=0, steps=4)
