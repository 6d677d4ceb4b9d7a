"""Triton path ops: op registration (opcheck) under the interpreter, and on a GPU against the
reference with large, odd and strided shapes. Backend-vs-reference on small shapes runs in
``test_path_ops.py`` through the ``cpu_backend`` fixture (``TRITON_INTERPRET=1``)."""
from __future__ import annotations

import pytest
import torch

from taylor_kernels import backends
from taylor_kernels.reference import path as ref
from tests.conftest import assert_close_ratio, requires_cuda, requires_interpreted_triton

interpreted = requires_interpreted_triton


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


@interpreted
def test_registered_triton_ops_check_their_arguments():
    """``torch.ops.taylor_kernels.*_triton`` are callable directly: they checked nothing, and a
    chunk past the points wrote past the output (heap corruption), read past ``x``, or ran
    another function for an unknown code. They now raise as the native ops do."""
    from taylor_kernels.triton import hessian, jet  # noqa: F401  (registers the ops)
    ops = tri()
    x, bl, alphas, weights = make(2, 2, 3, 5, False, torch.float32, False)  # 12 points
    idx = torch.tensor([0, 4])
    c = torch.randn(3, 2, 6)
    for call, match in [
            (lambda: ops.path_points_triton(x, bl, alphas, 10, 6), "outside"),
            (lambda: ops.path_accumulate_triton(torch.randn(6, 5), x, bl, weights, 10),
             "outside"),
            (lambda: ops.ih_accumulate_triton(torch.randn(6, 2, 5), x, bl, weights, idx, 10),
             "outside"),
            (lambda: ops.path_points_triton(x, bl[:, :, :4], alphas, 0, 1), "do not match"),
            (lambda: ops.jet_unary_triton(torch.randn(3, 4), 99), "out of range"),
            (lambda: ops.jet_unary_triton(torch.randn(17, 4), 0), "J\\+1"),
            (lambda: ops.jet_mul_triton(torch.randn(3, 4), torch.randn(2, 4)), "one shape"),
            (lambda: ops.jet_unary_triton(torch.randn(3, 4), 15), "out of range"),  # len(FNS)
            (lambda: ops.jet_mul_triton(torch.randn(3, 4), torch.randn(3, 4).double()),
             "one shape/dtype"),
            (lambda: ops.polarize_contract_triton(c, torch.ones(2), -1), "outside"),
            (lambda: ops.polarize_contract_triton(c, torch.ones(2), 3), "outside")]:  # J + 1
        with pytest.raises(ValueError, match=match):
            call()


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


def plan(*args):
    from taylor_kernels.triton.path import accumulate_plan
    return accumulate_plan(*args)


def test_accumulate_plan_fills_the_gpu():
    """A chunk with work for every SM launches >= 132 programs however few rows it touches;
    the plan depends on the shapes alone."""
    for nb, D, count, K, S in [(1, 1000, 4096, 1, 4096), (2, 3072, 1024, 4, 128),
                               (1, 150528, 64, 1, 64), (1, 768, 2048, 2, 1024)]:
        splits, block, programs = plan(nb, D, count, K, S)
        assert programs >= 132 and programs == splits * nb * -(-D // block)
        assert plan(nb, D, count, K, S) == (splits, block, programs)
        assert count // splits >= 16 or splits == 1
    assert plan(64, 4096, 64 * 32, 1, 32)[0] == 1  # enough rows: no second pass


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(2, 2, 37, 5, False, False, 0, 148),
                                  (3, 3, 23, 19, True, True, 11, 170)], ids=str)
def test_split_accumulate_matches_reference(dtype, case):
    """Odd shapes with several splits per row (and chunks starting mid-path)."""
    B, K, S, D, shared, per_point, start, count = case
    x, bl, _, w = make(B, K, S, D, shared, dtype, per_point)
    assert plan(B, D, count, K, S)[0] > 1
    grads = torch.randn(count, D, dtype=dtype)
    got = tri().path_accumulate_triton(grads, x, bl, w, start)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_ratio(got, ref.path_accumulate(grads, x, bl, w, start), got.dtype)


@interpreted
def test_split_accumulate_bitwise_stable():
    x, bl, _, w = make(2, 2, 41, 7, False, torch.float32, False)
    grads = torch.randn(164, 7)
    first = tri().path_accumulate_triton(grads, x, bl, w, 0)
    for _ in range(2):
        assert torch.equal(first, tri().path_accumulate_triton(grads, x, bl, w, 0))


@interpreted
def test_ih_bad_index_is_checked_in_the_kernel():
    """Triton ih_accumulate: an index outside [0, D) reads nothing out of bounds and gives NaN
    rows; the other rows are exact. The public op raises for CPU tensors."""
    from taylor_kernels.ops.hessian import ih_accumulate
    from taylor_kernels.reference.hessian import ih_accumulate as ref_ih
    from taylor_kernels.triton import hessian  # noqa: F401  (registers the op)
    x, bl, _, w = make(2, 1, 3, 5, False, torch.float32, False)
    h = torch.randn(6, 3, 5)
    idx = torch.tensor([1, 5, -1])
    out = tri().ih_accumulate_triton(h, x, bl, w, idx, 0)
    assert out[:, 1:].isnan().all() and not out[:, 0].isnan().any()
    good = ref_ih(h[:, :1], x, bl, w, idx[:1], 0)
    assert_close_ratio(out[:, :1], good, torch.float32)
    with pytest.raises(ValueError, match="index"):
        ih_accumulate(h, x, bl, w, idx, 0)


@requires_cuda
def test_ih_bad_index_on_gpu_does_not_sync():
    """On a GPU neither backend synchronizes for the index check; bad rows come back NaN."""
    from taylor_kernels.ops.hessian import ih_accumulate
    x, bl, _, w = make(2, 1, 3, 5, False, torch.float32, False, device="cuda")
    h = torch.randn(6, 2, 5, device="cuda")
    idx = torch.tensor([1, 7], device="cuda")
    for name in [n for n in ("cuda", "triton") if backends.runs_on(n, x.device)]:
        with backends.using(name):
            ih_accumulate(h, x, bl, w, idx, 0)  # compile / load outside the sync check
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = ih_accumulate(h, x, bl, w, idx, 0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert out[:, 1].isnan().all() and not out[:, 0].isnan().any()


@requires_cuda
@pytest.mark.parametrize("shape", [(1, 1, 4096, 1000), (2, 4, 128, 3072), (3, 2, 333, 517)],
                         ids=str)
def test_cuda_split_accumulate_bitwise_stable(shape):
    B, K, S, D = shape
    x, bl, _, w = make(B, K, S, D, False, torch.float32, False, device="cuda")
    grads = torch.randn(B * K * S, D, device="cuda")
    first = tri().path_accumulate_triton(grads, x, bl, w, 0)
    assert_close_ratio(first, ref.path_accumulate(grads, x, bl, w, 0), torch.float32)
    for _ in range(3):
        assert torch.equal(first, tri().path_accumulate_triton(grads, x, bl, w, 0))


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_registered_ops_refuse_one_meta_operand(suffix):
    """A registered op called directly with one ``meta`` operand (the rest on the CPU) runs
    its fake kernel, which returned uninitialised CPU memory (values like 2.3e31, found by a
    QA pass): the fake kernels now check that the operands share a device."""
    from taylor_kernels import _native
    from taylor_kernels.triton import hessian, jet  # noqa: F401  (registers the ops)
    if not suffix and not _native.has_cpp():
        pytest.skip("extension not built")
    ops = torch.ops.taylor_kernels
    x, bl, alphas, weights = make(2, 2, 3, 5, False, torch.float32, False)
    idx = torch.tensor([0, 4])
    meta = torch.device("meta")
    for name, args in [
            ("path_points", (x, bl.to(meta), alphas, 0, 3)),
            ("path_accumulate", (torch.randn(3, 5, device=meta), x, bl, weights, 0)),
            ("ih_accumulate", (torch.randn(3, 2, 5), x, bl, weights, idx.to(meta), 0)),
            ("jet_mul", (torch.randn(3, 4), torch.randn(3, 4, device=meta))),
            ("polarize_contract", (torch.randn(3, 2, 6), torch.ones(2, device=meta), 1))]:
        with pytest.raises((ValueError, RuntimeError), match="device"):
            getattr(ops, name + suffix)(*args)


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_fake_kernels_make_the_real_ops_checks(suffix):
    """Shape inference (every operand ``meta``, as under ``torch.export``) refuses what the
    real op refuses: the fake kernels checked only devices, so a chunk past the points, 40
    jet coefficients or a wrong ``gamma`` traced into a program the op would reject."""
    from taylor_kernels import _native
    from taylor_kernels.triton import hessian, jet  # noqa: F401  (registers the ops)
    if not suffix and not _native.has_cpp():
        pytest.skip("extension not built")
    ops = torch.ops.taylor_kernels
    meta = torch.device("meta")
    x, bl, alphas, weights = (t.to(meta) for t in make(2, 2, 3, 5, False, torch.float32,
                                                        False))
    for name, args, match in [
            ("path_points", (x, bl, alphas, 0, 500), "outside"),
            ("path_points", (x.long(), bl, alphas, 0, 3), "floating"),
            ("path_accumulate", (torch.randn(3, 4, device=meta), x, bl, weights, 0), "match"),
            ("ih_accumulate", (torch.randn(3, 2, 5, device=meta), x, bl, weights,
                               torch.zeros(3, dtype=torch.long, device=meta), 0), "entries"),
            ("jet_unary", (torch.randn(40, 2, device=meta), 0), "J\\+1"),
            ("jet_mul", (torch.randn(3, 5, device=meta), torch.randn(3, 2, device=meta)),
             "shape"),
            ("polarize_contract", (torch.randn(3, 2, 6, device=meta),
                                   torch.ones(1, device=meta), 1), "gamma")]:
        with pytest.raises((ValueError, TypeError), match=match):
            getattr(ops, name + suffix)(*args)


def test_launch_device_is_none_for_cpu_and_fake_tensors():
    """Only a real CUDA tensor on another device than the current one moves a launch."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from taylor_kernels.triton.launch import launch_device
    assert launch_device((torch.ones(2), 3, None)) is None
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(2))
    assert launch_device((fake,)) is None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_triton_kernels_run_on_their_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: Triton launched on the current device."""
    from taylor_kernels.ops.hessian import ih_accumulate
    from taylor_kernels.ops.path import path_accumulate, path_points
    x, bl, nodes, w = make(2, 3, 4, 5, False, torch.float32, False, device="cuda:1")
    h = torch.randn(2 * 3 * 4, 2, 5, device="cuda:1")
    idx = torch.tensor([1, 3], device="cuda:1")
    g = torch.randn(24, 5, device="cuda:1")
    with torch.cuda.device(0), backends.using("triton"):
        got = (path_points(x, bl, nodes, 0, 24), path_accumulate(g, x, bl, w, 0),
               ih_accumulate(h, x, bl, w, idx, 0))
    with backends.using("reference"):
        want = (path_points(x, bl, nodes, 0, 24), path_accumulate(g, x, bl, w, 0),
                ih_accumulate(h, x, bl, w, idx, 0))
    for a, b in zip(got, want):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a, b)
