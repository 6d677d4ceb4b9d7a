"""Path ops: each backend against the reference; the reference against a naive loop."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk
from taylor_kernels.reference import path as ref
from tests.conftest import assert_close_ratio

# (B, K, S, D, shared_baseline): odd sizes on purpose, incl. size 1 and non powers of two.
SHAPES = [(1, 1, 1, 1, True), (3, 2, 5, 7, False), (2, 3, 4, 129, True), (5, 1, 7, 33, False)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def make_inputs(B, K, S, D, shared, dtype, strided=False):
    x = torch.randn(B, 2 * D if strided else D, dtype=dtype)
    x = x[:, ::2] if strided else x
    bl = torch.randn(1 if shared else B, K, D, dtype=dtype)
    if strided:
        bl = torch.randn(1 if shared else B, D, K, dtype=dtype).transpose(1, 2)
    alphas = torch.rand(S, dtype=torch.float64)
    weights = torch.rand(S, dtype=torch.float64) / S
    return x, bl, alphas, weights


def naive_path_points(x, bl, alphas):
    B, K, S = x.shape[0], bl.shape[1], alphas.shape[0]
    rows = []
    for b in range(B):
        for k in range(K):
            base = bl[b if bl.shape[0] > 1 else 0, k].double()
            for s in range(S):
                rows.append(base + alphas[s].double() * (x[b].double() - base))
    return torch.stack(rows)


def test_reference_matches_naive_loop():
    x, bl, alphas, weights = make_inputs(3, 2, 5, 7, False, torch.float64)
    pts = naive_path_points(x, bl, alphas)
    torch.testing.assert_close(ref.path_points(x, bl, alphas, 0, 30), pts)
    grads = torch.randn(30, 7, dtype=torch.float64)
    expect = torch.zeros(3, 7, dtype=torch.float64)
    for n in range(30):
        b, k, s = n // 10, (n // 5) % 2, n % 5
        expect[b] += weights[s] * grads[n] * (x[b] - bl[b, k]) / 2
    torch.testing.assert_close(ref.path_accumulate(grads, x, bl, weights, 0), expect)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}K{}S{}D{}{}".format(
    *s[:4], "shared" if s[4] else "perinput"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_backend_matches_reference(cpu_backend, shape, dtype, strided):
    B, K, S, D, shared = shape
    x, bl, alphas, weights = make_inputs(B, K, S, D, shared, dtype, strided)
    total = B * K * S
    for start, count in [(0, total), (total // 3, total - total // 3), (total - 1, 1)]:
        got = tk.ops.path_points(x, bl, alphas, start, count)
        assert got.dtype == dtype
        assert_close_ratio(got, ref.path_points(x, bl, alphas, start, count), dtype)
        grads = torch.randn(count, D, dtype=dtype)
        got = tk.ops.path_accumulate(grads, x, bl, weights, start)
        want = ref.path_accumulate(grads, x, bl, weights, start)
        assert got.dtype == want.dtype
        assert_close_ratio(got, want, dtype if dtype != torch.bfloat16 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_per_path_nodes_and_weights(cpu_backend, dtype):
    """alphas/weights [B, K, S]: one value per path point, read at the flattened index."""
    B, K, S, D = 3, 2, 4, 19
    x, bl, _, _ = make_inputs(B, K, S, D, False, dtype)
    alphas = torch.rand(B, K, S, dtype=torch.float64)
    weights = torch.rand(B, K, S, dtype=torch.float64)
    for start, count in [(0, B * K * S), (5, 11)]:
        got = tk.ops.path_points(x, bl, alphas, start, count)
        assert_close_ratio(got, ref.path_points(x, bl, alphas, start, count), dtype)
        grads = torch.randn(count, D, dtype=dtype)
        assert_close_ratio(tk.ops.path_accumulate(grads, x, bl, weights, start),
                           ref.path_accumulate(grads, x, bl, weights, start), dtype)
    # a per-path tensor holding the same value everywhere equals the shared [S] rule
    shared = torch.rand(S, dtype=torch.float64)
    torch.testing.assert_close(tk.ops.path_points(x, bl, shared.expand(B, K, S), 0, B * K * S),
                               tk.ops.path_points(x, bl, shared, 0, B * K * S))


def test_empty_chunk(cpu_backend):
    x, bl, alphas, weights = make_inputs(2, 2, 3, 5, True, torch.float32)
    assert tk.ops.path_points(x, bl, alphas, 4, 0).shape == (0, 5)
    out = tk.ops.path_accumulate(torch.empty(0, 5), x, bl, weights, 4)
    assert out.shape == (2, 5) and (out == 0).all()


def test_chunking_is_exact_sum(cpu_backend):
    x, bl, alphas, weights = make_inputs(3, 2, 5, 11, False, torch.float64)
    grads = torch.randn(30, 11, dtype=torch.float64)
    whole = tk.ops.path_accumulate(grads, x, bl, weights, 0)
    parts = sum(tk.ops.path_accumulate(grads[a:a + 7], x, bl, weights, a) for a in range(0, 30, 7))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", ["baseline_shape", "range", "grads_shape"])
def test_bad_arguments_raise(cpu_backend, bad):
    x, bl, alphas, weights = make_inputs(2, 2, 3, 5, False, torch.float32)
    with pytest.raises(ValueError):
        if bad == "baseline_shape":
            tk.ops.path_points(x, torch.randn(3, 2, 5), alphas, 0, 1)
        elif bad == "range":
            tk.ops.path_points(x, bl, alphas, 10, 5)
        else:
            tk.ops.path_accumulate(torch.randn(3, 4), x, bl, weights, 0)


BAD_TYPES = {  # (call, error): wrong dtypes, devices and index types are refused up front
    "int_x": (lambda x, bl, a, w: tk.ops.path_points(x.long(), bl, a, 0, 1), TypeError),
    "int_alphas": (lambda x, bl, a, w: tk.ops.path_points(x, bl, (a * 4).long(), 0, 1),
                   TypeError),
    "int_grads": (lambda x, bl, a, w: tk.ops.path_accumulate(torch.ones(2, 5, dtype=torch.long),
                                                           x, bl, w, 0), TypeError),
    "meta_alphas": (lambda x, bl, a, w: tk.ops.path_points(x, bl, a.to("meta"), 0, 1),
                    ValueError),
    "meta_grads": (lambda x, bl, a, w: tk.ops.path_accumulate(torch.ones(2, 5, device="meta"),
                                                            x, bl, w, 0), ValueError),
    "bool_start": (lambda x, bl, a, w: tk.ops.path_points(x, bl, a, True, 1), TypeError),
    "float_count": (lambda x, bl, a, w: tk.ops.path_points(x, bl, a, 0, 2.0), TypeError),
}


@pytest.mark.parametrize("bad", BAD_TYPES)
def test_bad_types_and_devices_raise_on_every_backend(cpu_backend, bad):
    """The C++ kernel checked dtypes itself but the reference and Triton did not (an int x
    was truncated); a meta operand beside CPU ones reached the kernels (garbage out)."""
    x, bl, alphas, weights = make_inputs(2, 2, 3, 5, False, torch.float32)
    call, error = BAD_TYPES[bad]
    with pytest.raises(error):
        call(x, bl, alphas, weights)


def test_backward_of_transposed_baselines(cpu_backend):
    """Baselines as a transposed view: their gradient was built by ``zeros_like(...).view``,
    which kept the transpose's strides and raised on the C++ and Triton backends."""
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    bl = torch.randn(2, 4, 3, dtype=torch.float64).transpose(1, 2).requires_grad_()
    alphas = torch.rand(5, dtype=torch.float64)
    grads = torch.randn(2 * 3 * 5, 4, dtype=torch.float64)
    for out in (tk.ops.path_points(x, bl, alphas, 0, 30),
                tk.ops.path_accumulate(grads, x, bl, alphas, 0)):
        (got,) = torch.autograd.grad(out.sum(), bl)
        with tk.backends.using("reference"):
            again = tk.ops.path_points(x, bl, alphas, 0, 30) if out.shape[0] == 30 else \
                tk.ops.path_accumulate(grads, x, bl, alphas, 0)
            (want,) = torch.autograd.grad(again.sum(), bl)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradcheck(cpu_backend):
    x, bl, alphas, weights = make_inputs(2, 2, 3, 4, False, torch.float64)
    grads = torch.randn(9, 4, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (grads, x, bl, weights)]
    assert torch.autograd.gradcheck(lambda g, a, b, w: tk.ops.path_accumulate(g, a, b, w, 3), args)
    assert torch.autograd.gradgradcheck(
        lambda g, a, b, w: tk.ops.path_accumulate(g, a, b, w, 3), args)
    pargs = [t.clone().requires_grad_() for t in (x, bl, alphas)]
    assert torch.autograd.gradcheck(lambda a, b, al: tk.ops.path_points(a, b, al, 2, 8), pargs)
    per_path = [t.clone().requires_grad_() for t in (grads, x, bl, torch.rand(2, 2, 3).double())]
    assert torch.autograd.gradcheck(lambda g, a, b, w: tk.ops.path_accumulate(g, a, b, w, 3),
                                    per_path)
    pargs[2] = torch.rand(2, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, al: tk.ops.path_points(a, b, al, 2, 8), pargs)
