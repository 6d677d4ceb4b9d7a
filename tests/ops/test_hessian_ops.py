"""ih_accumulate: reference vs a naive loop; each backend vs the reference (odd shapes, dtypes,
strided inputs, per-point weights); opcheck of the native and Triton ops; gradcheck."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk
from taylor_kernels import backends
from taylor_kernels.ops.hessian import ih_accumulate
from taylor_kernels.reference import hessian as ref
from tests.conftest import assert_close_ratio, requires_cuda, requires_interpreted_triton

# (B, K, S, D, R, shared_baseline): odd sizes, size 1, R < D and R = D
SHAPES = [(1, 1, 1, 1, 1, True), (3, 2, 5, 7, 3, False), (2, 3, 2, 33, 5, True)]


def make(B, K, S, D, R, shared, dtype, per_point=False, strided=False, device="cpu"):
    total = B * K * S
    h = torch.randn(total, R, 2 * D if strided else D, dtype=dtype, device=device)
    h = h[:, :, ::2] if strided else h
    x = torch.randn(B, D, dtype=dtype, device=device)
    bl = torch.randn(1 if shared else B, K, D, dtype=dtype, device=device)
    if strided:
        bl = torch.randn(1 if shared else B, D, K, dtype=dtype, device=device).transpose(1, 2)
    w = torch.rand((B, K, S) if per_point else (S,), dtype=torch.float64, device=device)
    idx = torch.randperm(D, device=device)[:R]
    return h, x, bl, w, idx


def test_reference_matches_naive_loop():
    h, x, bl, w, idx = make(3, 2, 5, 7, 3, False, torch.float64)
    out = torch.zeros(3, 3, 7, dtype=torch.float64)
    for n in range(30):
        b, k, s = n // 10, (n // 5) % 2, n % 5
        delta = x[b] - bl[b, k]
        for r in range(3):
            out[b, r] += w[s] * h[n, r] * delta[idx[r]] * delta / 2
    torch.testing.assert_close(ref.ih_accumulate(h, x, bl, w, idx, 0), out)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}K{}S{}D{}R{}".format(*s[:5]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("variant", ["plain", "strided_per_point"])
def test_backend_matches_reference(cpu_backend, shape, dtype, variant):
    h, x, bl, w, idx = make(*shape, dtype, per_point=variant != "plain",
                            strided=variant != "plain")
    total = h.shape[0]
    for start, count in [(0, total), (total // 3, total - total // 3), (total - 1, 1)]:
        got = ih_accumulate(h[start:start + count], x, bl, w, idx, start)
        expect = ref.ih_accumulate(h[start:start + count], x, bl, w, idx, start)
        assert got.dtype == dtype and got.is_contiguous()
        assert_close_ratio(got, expect, dtype)


def test_chunks_sum_to_whole(cpu_backend):
    h, x, bl, w, idx = make(3, 2, 5, 7, 4, False, torch.float64)
    whole = ih_accumulate(h, x, bl, w, idx, 0)
    parts = sum(ih_accumulate(h[s:s + 7], x, bl, w, idx, s) for s in range(0, 30, 7))
    assert_close_ratio(parts, whole, torch.float64)


def test_empty_chunk_and_bad_arguments(cpu_backend):
    h, x, bl, w, idx = make(2, 1, 3, 5, 2, True, torch.float32)
    assert ih_accumulate(h[:0], x, bl, w, idx, 0).abs().sum() == 0
    with pytest.raises(ValueError, match="index"):
        ih_accumulate(h, x, bl, w, torch.tensor([0, 5]), 0)
    with pytest.raises(TypeError, match="int64"):
        ih_accumulate(h, x, bl, w, idx.int(), 0)
    with pytest.raises(TypeError, match="int64"):  # (a list: AttributeError '.device')
        ih_accumulate(h, x, bl, w, idx.tolist(), 0)
    with pytest.raises(ValueError, match="chunk"):
        ih_accumulate(h, x, bl, w, idx, 1)
    with pytest.raises(ValueError, match="count, R, D"):
        ih_accumulate(h[:, :, :4], x, bl, w, idx, 0)


def test_gradcheck(cpu_backend):
    """The backward formula (shared by the native and Triton ops) against finite differences;
    tiny shapes because the Triton interpreter runs every perturbed forward."""
    h, x, bl, w, idx = make(1, 2, 2, 3, 2, False, torch.float64)
    args = [h[1:4].clone(), x, bl, w]
    for t in args:
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c, d: ih_accumulate(a, b, c, d, idx, 1), args)
    wp = torch.rand(1, 2, 2, dtype=torch.float64, requires_grad=True)
    hp = h[:3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, d: ih_accumulate(a, x, bl[:1], d, idx, 0), [hp, wp])


OPCHECK = [(2, 3, 4, 5, 2, False, torch.float64, False, 3, 14),
           (2, 2, 3, 7, 7, True, torch.float32, True, 2, 7)]


@pytest.mark.skipif(not backends.available()["cpp"], reason="extension not built")
@pytest.mark.parametrize("case", OPCHECK, ids=str)
def test_opcheck_native(case):
    B, K, S, D, R, shared, dtype, per_point, start, count = case
    h, x, bl, w, idx = make(B, K, S, D, R, shared, dtype, per_point)
    args = (h[start:start + count].clone().requires_grad_(), x.requires_grad_(), bl, w, idx,
            start)
    torch.library.opcheck(torch.ops.taylor_kernels.ih_accumulate.default, args)


@requires_interpreted_triton
def test_opcheck_triton_interpreted():
    from taylor_kernels.triton import hessian  # noqa: F401  (registers the op)
    h, x, bl, w, idx = make(2, 3, 4, 5, 2, False, torch.float64)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.taylor_kernels.ih_accumulate_triton.default,
                          (h[3:17], x, bl, w, idx, 3), test_utils=utils)


@requires_cuda
@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_backends_match_reference(name, dtype):
    if not backends.available()[name]:
        pytest.skip(f"backend {name} unavailable")
    h, x, bl, w, idx = make(3, 2, 7, 300, 17, False, dtype, per_point=True, device="cuda")
    with tk.backends.using(name):
        got = ih_accumulate(h[5:40], x, bl, w, idx, 5)
    assert_close_ratio(got, ref.ih_accumulate(h[5:40], x, bl, w, idx, 5), dtype)


@pytest.mark.skipif(not backends.available()["cpp"], reason="extension not built")
def test_torch_compile_fullgraph_traces_native_op():
    """The fake kernel and autograd formula let torch.compile trace the op without breaks."""
    h, x, bl, w, idx = make(2, 2, 3, 5, 2, False, torch.float64)
    h = h.requires_grad_(True)

    def fn(hr):
        return torch.ops.taylor_kernels.ih_accumulate(hr, x, bl, w, idx, 0).square().sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    (g,) = torch.autograd.grad(compiled(h), h)
    (g_ref,) = torch.autograd.grad(fn(h), h)
    torch.testing.assert_close(g, g_ref)
