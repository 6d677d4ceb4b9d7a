"""Jet ops: the reference against nested forward-mode AD; each backend against the reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import taylor_kernels as tk
from taylor_kernels.reference import jet as ref
from tests.conftest import assert_close_ratio, requires_cuda

TORCH_FNS = {
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "exp": torch.exp, "log": torch.log,
    "softplus": F.softplus, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu, "sin": torch.sin, "cos": torch.cos, "relu": torch.relu,
    "square": torch.square, "reciprocal": torch.reciprocal, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
}
POSITIVE = {"log", "reciprocal", "sqrt", "rsqrt"}  # need u_0 > 0


def make_jet(fn, J, N, dtype=torch.float64, strided=False, scale=0.5):
    u = torch.randn(N, J + 1, dtype=dtype).T if strided else torch.randn(J + 1, N, dtype=dtype)
    u = u * scale
    if fn in POSITIVE:
        u[0] = u[0].abs() + 0.5
    return u


def test_function_table_is_complete():
    assert set(TORCH_FNS) == set(ref.FNS)
    assert [ref.fn_code(n) for n in ref.FNS] == list(range(len(ref.FNS)))


@pytest.mark.parametrize("fn", ref.FNS)
def test_reference_matches_nested_jvp(fn):
    for J in range(0, 7):
        u = make_jet(fn, J, 9)
        got = ref.jet_unary(fn, u)
        want = ref.nested_jvp_coefficients(TORCH_FNS[fn], [u], J)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reference_mul_matches_nested_jvp():
    for J in range(0, 7):
        a, b = torch.randn(2, J + 1, 11, dtype=torch.float64)
        want = ref.nested_jvp_coefficients(torch.mul, [a, b], J)
        torch.testing.assert_close(ref.jet_mul(a, b), want, rtol=1e-10, atol=1e-10)


def test_exp_closed_form():
    # exp(u0 + t) has coefficients exp(u0) / k!
    u = torch.zeros(6, 3, dtype=torch.float64)
    u[0], u[1] = torch.tensor([0.0, 1.0, -2.0]), 1.0
    want = torch.stack([u[0].exp() / math.factorial(k) for k in range(6)])
    torch.testing.assert_close(ref.jet_unary("exp", u), want)


@pytest.mark.parametrize("fn", ref.FNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backend_unary_matches_reference(cpu_backend, fn, dtype):
    # every order 0..6 (odd N, strided on odd orders); the interpreter is slow: two of them
    cases = [(J, 37 if J % 2 else 130, J % 2 == 1) for J in range(7)] + [(3, 1, False)]
    for J, N, strided in cases[-4:-2] if cpu_backend == "triton" else cases:
        u = make_jet(fn, J, N, dtype, strided)
        got = tk.ops.jet_unary(fn, u)
        assert got.dtype == dtype and got.is_contiguous()
        assert_close_ratio(got, ref.jet_unary(fn, u.double()).to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_backend_mul_matches_reference(cpu_backend, dtype):
    for J, N, strided in [(0, 1, False), (3, 37, True), (6, 130, False)]:
        a = make_jet("mul", J, N, dtype, strided)
        b = make_jet("mul", J, N, dtype)
        got = tk.ops.jet_mul(a, b)
        assert got.dtype == dtype
        assert_close_ratio(got, ref.jet_mul(a.double(), b.double()).to(dtype), dtype)


def test_backend_bfloat16_unary(cpu_backend):
    u = make_jet("tanh", 3, 33, torch.bfloat16)
    assert_close_ratio(tk.ops.jet_unary("tanh", u), ref.jet_unary("tanh", u.double()).to(
        torch.bfloat16), torch.bfloat16)


def test_softplus_value_has_no_threshold(cpu_backend):
    """The reference and C++ value was torch's ``softplus(threshold=20)``, ``u`` itself above
    20: 1.4e-11 off at 25 in float64 (1.9e-9 at 20.1) while order 1 is ``sigmoid(u)``, and
    Triton's exact value differed from theirs. Now ``log(1 + e^u)`` everywhere."""
    u0 = torch.tensor([20.1, 25.0, 36.0, 1e3, -1e3], dtype=torch.float64)
    u = torch.stack([u0, torch.ones_like(u0)])
    got = tk.ops.jet_unary("softplus", u)[0]
    want = torch.tensor([20.1 + math.log1p(math.exp(-20.1)), 25.0 + math.log1p(math.exp(-25.0)),
                         36.0 + math.log1p(math.exp(-36.0)), 1e3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_softplus_keeps_its_relative_precision_far_below_zero(cpu_backend, dtype):
    """softplus(u) = log1p(exp(u)) for very negative u: Triton's log(1 + exp(-|u|)) gave 0 at
    -20 (float32) and 4e-4 relative error at -10."""
    u0 = torch.tensor([-10.0, -20.0, -40.0, -80.0], dtype=torch.float64)
    u = torch.stack([u0, torch.ones_like(u0)]).to(dtype)
    got = tk.ops.jet_unary("softplus", u)[0].double()
    want = torch.nn.functional.softplus(u0)
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-14,
                               atol=0)


def test_relu_kink_is_ignored(cpu_backend):
    u = torch.tensor([[-1.0, 0.0, 2.0], [1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])
    out = tk.ops.jet_unary("relu", u)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 2.0], [0, 0, 1.0], [0, 0, 3.0]]))


# The interpreter runs Triton kernels on host pointers, so the AOT-dispatch checks (tracing
# with fake tensors through the launch) run only for the C++ ops here and on a GPU.
INTERPRETED_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _registered_ops():
    ops = []
    if tk.backends.available()["cpp"]:
        ops.append((torch.ops.taylor_kernels.jet_unary.default,
                    torch.ops.taylor_kernels.jet_mul.default, None))
    if tk.backends.runs_on("triton", torch.device("cpu")):
        from taylor_kernels.triton import jet as triton_jet  # noqa: F401  (registers the ops)
        ops.append((torch.ops.taylor_kernels.jet_unary_triton.default,
                    torch.ops.taylor_kernels.jet_mul_triton.default, INTERPRETED_UTILS))
    return ops


@pytest.mark.parametrize("fn", ["tanh", "gelu", "log"])
def test_opcheck(fn):
    if not _registered_ops():
        pytest.skip("neither the C++ nor interpreted Triton jet ops are available here")
    for unary_op, mul_op, utils in _registered_ops():
        kw = {} if utils is None else {"test_utils": utils}
        u = make_jet(fn, 3, 7).requires_grad_(True)
        torch.library.opcheck(unary_op, (u, ref.fn_code(fn)), **kw)
        a, b = (make_jet("mul", 3, 7).requires_grad_(True) for _ in range(2))
        torch.library.opcheck(mul_op, (a, b), **kw)


def _small(backend):
    # the Triton interpreter is slow: the smallest shapes, first order only (the autograd
    # formulas are the same registered functions for every backend, checked in full elsewhere)
    return (2, 3) if backend == "triton" else (3, 5)


@pytest.mark.parametrize("fn", ["tanh", "gelu_tanh", "softplus", "rsqrt", "sin"])
def test_gradcheck_unary(cpu_backend, fn):
    J, N = _small(cpu_backend)
    u = make_jet(fn, J, N).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: tk.ops.jet_unary(fn, v), (u,))
    if cpu_backend != "triton":
        assert torch.autograd.gradgradcheck(lambda v: tk.ops.jet_unary(fn, v), (u,))


def test_gradcheck_mul(cpu_backend):
    J, N = _small(cpu_backend)
    a, b = (make_jet("mul", J, N).requires_grad_(True) for _ in range(2))
    assert torch.autograd.gradcheck(tk.ops.jet_mul, (a, b))
    if cpu_backend != "triton":
        assert torch.autograd.gradgradcheck(tk.ops.jet_mul, (a, b))


@pytest.mark.skipif(not tk.backends.available()["cpp"], reason="extension not built")
def test_compile_fullgraph():
    ops = torch.ops.taylor_kernels
    f = torch.compile(lambda u: ops.jet_mul(ops.jet_unary(u, ref.fn_code("tanh")), u),
                      fullgraph=True, backend="aot_eager")
    u = make_jet("tanh", 3, 8)
    torch.testing.assert_close(f(u), ref.jet_mul(ref.jet_unary("tanh", u), u))


@pytest.mark.parametrize("bad, err", [
    (lambda: tk.ops.jet_unary("cosh", torch.zeros(2, 3)), ValueError),
    (lambda: tk.ops.jet_unary(99, torch.zeros(2, 3)), ValueError),
    (lambda: tk.ops.jet_unary(1.5, torch.zeros(2, 3)), TypeError),
    (lambda: tk.ops.jet_unary("tanh", torch.zeros(3)), ValueError),
    (lambda: tk.ops.jet_unary("tanh", torch.zeros(17, 3)), ValueError),
    (lambda: tk.ops.jet_unary("tanh", torch.zeros(2, 3, dtype=torch.int64)), TypeError),
    (lambda: tk.ops.jet_mul(torch.zeros(2, 3), torch.zeros(3, 3)), ValueError),
    (lambda: tk.ops.polarize(torch.zeros(3, 2, 4), (1, 0)), ValueError),
    (lambda: tk.ops.polarize(torch.zeros(2, 3, 4), (1, 1)), ValueError),
])
def test_errors(bad, err):
    with pytest.raises(err):
        bad()


def _cubic_model():
    W = torch.randn(4, 4, 4, dtype=torch.float64)
    return lambda x: torch.einsum("i,j,k,ijk->", x, x, x, W) + torch.sin(x).prod() + x.exp().sum()


@pytest.mark.parametrize("idx", [(0, 1), (2, 2), (0, 1, 2), (0, 0, 3), (1, 1, 1), (0, 1, 2, 3),
                                 (2, 2, 3, 3)])
def test_polarize_matches_autograd_derivatives(idx):
    f, x = _cubic_model(), torch.randn(4, dtype=torch.float64)
    feats = list(dict.fromkeys(idx))
    pattern = tuple(idx.count(i) for i in feats)
    weights, _ = tk.ops.polarization_rule(pattern)
    dirs = weights.double() @ torch.eye(4, dtype=torch.float64)[feats]
    d = len(idx)
    c = torch.stack([ref.nested_jvp_coefficients(f, [torch.stack([x, v])], d) for v in dirs], 1)
    D = torch.func.jacrev(f)
    for _ in range(d - 1):
        D = torch.func.jacfwd(D)
    torch.testing.assert_close(tk.ops.polarize(c, pattern), D(x)[idx], rtol=1e-9, atol=1e-9)


def test_polarization_rule_order_two_is_the_classic_formula():
    # d_i d_j f = c2(e_i + e_j) - c2(2 e_i)/4 - c2(2 e_j)/4 (c2: order-2 coefficient)
    weights, gamma = ref.polarization_rule((1, 1))
    table = {tuple(w.tolist()): g.item() for w, g in zip(weights, gamma)}
    assert table == pytest.approx({(1, 1): 1.0, (2, 0): -0.25, (0, 2): -0.25})


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("fn", ref.FNS)
def test_cuda_backends_match_reference(backend, fn):
    if not tk.backends.runs_on(backend, torch.device("cuda")):
        pytest.skip(f"{backend} not available")
    with tk.backends.using(backend):
        for dtype in (torch.float32, torch.float64):
            u = make_jet(fn, 5, 1001, dtype, strided=True).cuda()
            assert_close_ratio(tk.ops.jet_unary(fn, u).cpu(),
                               ref.jet_unary(fn, u.double().cpu()).to(dtype), dtype)
            a, b = make_jet("mul", 5, 1001, dtype).cuda(), make_jet("mul", 5, 1001, dtype).cuda()
            assert_close_ratio(tk.ops.jet_mul(a, b).cpu(),
                               ref.jet_mul(a.double(), b.double()).cpu().to(dtype), dtype)


@requires_cuda
def test_opcheck_cuda():
    u = make_jet("gelu", 3, 7).cuda().requires_grad_(True)
    a, b = (make_jet("mul", 3, 7).cuda().requires_grad_(True) for _ in range(2))
    if tk.backends.available()["cuda"]:
        torch.library.opcheck(torch.ops.taylor_kernels.jet_unary.default, (u, ref.fn_code("gelu")))
        torch.library.opcheck(torch.ops.taylor_kernels.jet_mul.default, (a, b))
    from taylor_kernels.triton import jet as triton_jet  # noqa: F401  (registers the ops)
    torch.library.opcheck(torch.ops.taylor_kernels.jet_unary_triton.default,
                          (u, ref.fn_code("gelu")))
    torch.library.opcheck(torch.ops.taylor_kernels.jet_mul_triton.default, (a, b))
