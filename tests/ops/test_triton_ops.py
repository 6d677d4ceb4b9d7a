"""Triton path ops: op registration (opcheck) under the interpreter, and on a GPU against the
reference with large, odd and strided shapes. Backend-vs-reference on small shapes runs in
``test_path_ops.py`` through the ``cpu_backend`` fixture (``TRITON_INTERPRET=1``)."""
from __future__ import annotations

import pytest
import torch

from taylor_kernels import backends
from taylor_kernels.reference import path as ref
from tests.conftest import assert_close_ratio, requires_cuda

interpreted = pytest.mark.skipif(not backends.runs_on("triton", torch.device("cpu")),
                                 reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def tri():
    from taylor_kernels.triton import path  # noqa: F401  (registers the ops)
    return torch.ops.taylor_kernels


def make(B, K, S, D, shared, dtype, per_point, device="cpu"):
    x = torch.randn(B, D, dtype=dtype, device=device)
    bl = torch.randn(1 if shared else B, K, D, dtype=dtype, device=device)
    shape = (B, K, S) if per_point else (S,)
    return (x, bl, torch.rand(shape, dtype=torch.float64, device=device),
            torch.rand(shape, dtype=torch.float64, device=device) / S)


@interpreted
@pytest.mark.parametrize("case", [(2, 3, 4, 5, False, torch.float64, False, 3, 14),
                                  (2, 2, 3, 7, True, torch.float32, True, 2, 7)], ids=str)
def test_opcheck_interpreted(case):
    B, K, S, D, shared, dtype, per_point, start, count = case
    x, bl, alphas, weights = make(B, K, S, D, shared, dtype, per_point)
    grads = torch.randn(count, D, dtype=dtype)
    ops = tri()
    # The interpreter runs kernels on host pointers, so the AOT-dispatch checks (which trace
    # with fake tensors through the kernel launch) run only on a GPU (test below).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.path_points_triton.default, (x, bl, alphas, start, count),
                          test_utils=utils)
    torch.library.opcheck(ops.path_accumulate_triton.default, (grads, x, bl, weights, start),
                          test_utils=utils)


@requires_cuda
def test_opcheck_cuda():
    x, bl, alphas, weights = make(2, 3, 4, 5, False, torch.float32, True, device="cuda")
    grads = torch.randn(14, 5, device="cuda", requires_grad=True)
    x.requires_grad_()
    torch.library.opcheck(tri().path_points_triton.default, (x, bl, alphas, 3, 14))
    torch.library.opcheck(tri().path_accumulate_triton.default, (grads, x, bl, weights, 3))


@interpreted
def test_touched_rows_only():
    """A chunk inside one input's paths leaves every other output row exactly zero."""
    x, bl, _, weights = make(4, 2, 3, 9, False, torch.float32, False)
    grads = torch.randn(4, 9)
    out = tri().path_accumulate_triton(grads, x, bl, weights, 7)
    assert (out[[0, 2, 3]] == 0).all()
    assert_close_ratio(out, ref.path_accumulate(grads, x, bl, weights, 7), torch.float32)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_point", [False, True], ids=["shared_rule", "perpoint"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, True), (3, 2, 5, 7, False),
                                   (4, 3, 70, 2051, False), (2, 2, 300, 64, True)], ids=str)
def test_cuda_matches_reference(dtype, per_point, shape):
    B, K, S, D, shared = shape
    x, bl, alphas, w = make(B, K, S, D, shared, dtype, per_point, device="cuda")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    total = B * K * S
    for start, count in [(0, total), (total // 3, total - total // 3), (total - 1, 1)]:
        got = tri().path_points_triton(x, bl, alphas, start, count)
        assert_close_ratio(got, ref.path_points(x, bl, alphas, start, count), dtype)
        grads = torch.randn(count, D, dtype=dtype, device="cuda")
        got = tri().path_accumulate_triton(grads, x, bl, w, start)
        assert got.dtype == acc
        assert_close_ratio(got, ref.path_accumulate(grads, x, bl, w, start), acc)


@requires_cuda
def test_cuda_strided_and_deterministic():
    x = torch.randn(3, 2 * 333, device="cuda")[:, ::2]
    bl = torch.randn(3, 333, 2, device="cuda").transpose(1, 2)
    alphas = torch.rand(40, device="cuda")
    grads = torch.randn(333, 240, device="cuda").t()
    first = tri().path_accumulate_triton(grads, x, bl, alphas, 0)
    assert torch.equal(first, tri().path_accumulate_triton(grads, x, bl, alphas, 0))
    assert_close_ratio(first, ref.path_accumulate(grads, x, bl, alphas, 0), torch.float32)
    assert_close_ratio(tri().path_points_triton(x, bl, alphas, 3, 200),
                       ref.path_points(x, bl, alphas, 3, 200), torch.float32)
