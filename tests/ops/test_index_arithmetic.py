"""64-bit offsets of the Triton kernels (``taylor_kernels.triton.index``).

On the CPU the helpers are evaluated by small probe kernels under ``TRITON_INTERPRET=1``, with
operands that fit int32 but whose products pass ``2**31`` (int32 wraps in the interpreter as on a
GPU; the first test shows it). On a GPU the ops themselves are run on tensors whose offsets pass
``2**31`` elements and compared with the reference on the far end of the tensors.
"""
from __future__ import annotations

import pytest
import torch

from taylor_kernels import backends
from tests.conftest import assert_close_ratio, requires_cuda, requires_interpreted_triton

interpreted = requires_interpreted_triton
BIG = 2**30 + 12345  # fits int32; 2*BIG and more do not


triton = pytest.importorskip("triton")
tl = triton.language
from taylor_kernels.triton.index import grid_cell, off, row_block, split_bounds  # noqa: E402


@triton.jit
def _naive(out_ptr, i, s):
    tl.store(out_ptr, i * s)


@triton.jit
def _offset(out_ptr, i, s):
    tl.store(out_ptr, off(i, s))


@triton.jit
def _block(out_ptr, pid, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), row_block(pid, BLOCK))


@triton.jit
def _split(out_ptr, lo, hi, j, splits):
    a, b = split_bounds(lo, hi, j, splits)
    tl.store(out_ptr, a)
    tl.store(out_ptr + 1, b)


@triton.jit
def _cell(out_ptr, D, BLOCK: tl.constexpr):
    row, d = grid_cell(D, BLOCK)
    pid = tl.program_id(0)
    tl.store(out_ptr + 2 * pid, row)
    tl.store(out_ptr + 2 * pid + 1, tl.min(d, axis=0))


def _run(kernel, n, *args, **kw):
    out = torch.zeros(n, dtype=torch.int64)
    kernel[(1,)](out, *args, **kw)
    return out.tolist()


@interpreted
def test_int32_products_wrap_in_the_interpreter():
    """The premise of the CPU checks: a plain product of int32 arguments wraps."""
    assert _run(_naive, 1, 3, BIG) != [3 * BIG]


@interpreted
@pytest.mark.parametrize("i,s", [(3, BIG), (BIG, 7), (15, 2**31 - 1), (0, BIG), (BIG, 1)])
def test_offset_is_int64(i, s):
    assert _run(_offset, 1, i, s) == [i * s]


@interpreted
def test_row_block_past_2_31():
    pid = 2**31 // 256 + 5  # program id fits int32, pid * BLOCK does not
    assert _run(_block, 256, pid, BLOCK=256) == list(range(pid * 256, pid * 256 + 256))


@interpreted
def test_grid_cell_rows_major():
    """A 1-d grid of rows x D-blocks: program p works on row p // nd, block p % nd."""
    out = torch.zeros(12, dtype=torch.int64)
    _cell[(6,)](out, 600, BLOCK=256)  # nd = 3 blocks of 256 for D = 600
    assert out.view(6, 2).tolist() == [[p // 3, (p % 3) * 256] for p in range(6)]


@interpreted
@pytest.mark.parametrize("lo,hi,j,splits", [(0, BIG, 200, 256), (5, 2**31 - 3, 255, 256),
                                            (7, 7 + 100, 3, 7)])
def test_split_bounds_past_2_31(lo, hi, j, splits):
    L = hi - lo
    assert _run(_split, 2, lo, hi, j, splits) == [lo + L * j // splits,
                                                        lo + L * (j + 1) // splits]


@interpreted
def test_chunk_end_past_2_31_in_the_accumulating_ops():
    """``start + count`` of two int32 arguments wrapped negative once it passed 2**31: the
    Triton ``path_accumulate`` and ``ih_accumulate`` ran no point and returned zeros, silently
    (found by a QA pass). The points of a chunk ending past 2**31 are tiny here: only the
    offsets are large."""
    from taylor_kernels.ops import ih_accumulate, path_accumulate
    from taylor_kernels.reference import hessian as ref_h
    from taylor_kernels.reference import path as ref_p
    K, S, D = 1, 65536, 2
    B = 2**31 // S + 1                    # B * K * S = 2**31 + 65536 points
    start, count = 2**31 - 10, 100        # the chunk crosses 2**31
    x, bl = torch.ones(B, D), torch.zeros(1, K, D)
    w = torch.rand(S, dtype=torch.float64)
    grads = torch.randn(count, D)
    h, idx = torch.randn(count, 2, D), torch.tensor([1, 0])
    want_p = ref_p.path_accumulate(grads, x, bl, w, start)
    want_h = ref_h.ih_accumulate(h, x, bl, w, idx, start)
    with backends.using("triton"):
        got_p = path_accumulate(grads, x, bl, w, start)
        got_h = ih_accumulate(h, x, bl, w, idx, start)
    assert want_p.abs().sum() > 0 and want_h.abs().sum() > 0
    torch.testing.assert_close(got_p, want_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-6)


# ---- GPU: the ops on tensors whose offsets pass 2**31 elements (about 60 GB at the peak) ----

def _backends_on_gpu():
    return [n for n in ("triton", "cuda") if backends.runs_on(n, torch.device("cuda"))]


@pytest.fixture
def gpu_memory():
    """Skip unless the GPU has room; free the cache after."""
    free, _ = torch.cuda.mem_get_info()
    if free < 70 * 2**30:
        pytest.skip(f"needs ~70 GiB free GPU memory, {free / 2**30:.0f} GiB free")
    yield
    torch.cuda.empty_cache()


@requires_cuda
@pytest.mark.parametrize("fn", ["tanh", "gelu_tanh"])
def test_jet_unary_past_2_31(gpu_memory, fn):
    """J=3, N > 2**31/3: k*N passes 2**31 at k=3 and the workspace offset (J+1)*N at 2."""
    from taylor_kernels.ops import jet_unary
    from taylor_kernels.reference.jet import jet_unary as ref
    N = 2**31 // 3 + 4099
    u = torch.randn(4, N, device="cuda", dtype=torch.bfloat16)
    tail = u[:, -3000:].float()
    for name in _backends_on_gpu():
        with backends.using(name):
            y = jet_unary(fn, u)
        assert_close_ratio(y[:, -3000:].float(), ref(fn, tail), torch.bfloat16)
        del y


@requires_cuda
def test_jet_mul_and_polarize_past_2_31(gpu_memory):
    from taylor_kernels.ops import jet_mul, polarize_contract
    from taylor_kernels.reference.jet import jet_mul as ref_mul
    N = 2**31 // 3 + 4099
    a = torch.randn(4, N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4, N, device="cuda", dtype=torch.bfloat16)
    c = a.view(1, 4, N)  # [J+1=1, M=4, N]: m*N passes 2**31 at m=3
    gamma = torch.randn(4, device="cuda", dtype=torch.float64)
    for name in _backends_on_gpu():
        with backends.using(name):
            got = jet_mul(a, b)[:, -3000:]
            pol = polarize_contract(c, gamma, 0)[-3000:]
        assert_close_ratio(got.float(), ref_mul(a[:, -3000:].float(), b[:, -3000:].float()),
                           torch.bfloat16)
        expect = (gamma.float()[:, None] * a[:, -3000:].float()).sum(0)
        assert_close_ratio(pol.float(), expect, torch.bfloat16)


@requires_cuda
def test_path_ops_past_2_31(gpu_memory):
    """count*D passes 2**31: path_points' output row offset and path_accumulate's g offset."""
    from taylor_kernels.ops import path_accumulate, path_points
    from taylor_kernels.reference import path as ref
    D, S = 32768, 2**31 // 32768 + 37
    x = torch.randn(1, D, device="cuda")
    bl = torch.randn(1, 1, D, device="cuda")
    alphas = torch.rand(S, device="cuda", dtype=torch.float64)
    weights = torch.rand(S, device="cuda", dtype=torch.float64) / S
    grads = torch.randn(S, D, device="cuda", dtype=torch.bfloat16)
    expect_acc = (torch.mv(grads.float().t(), weights.float()) * (x[0] - bl[0, 0]))[None]
    for name in _backends_on_gpu():
        with backends.using(name):
            pts = path_points(x, bl, alphas, 0, S)
            acc = path_accumulate(grads, x, bl, weights, 0)
        assert_close_ratio(pts[-5:], ref.path_points(x, bl, alphas, S - 5, 5), torch.float32)
        del pts
        assert_close_ratio(acc, expect_acc, torch.bfloat16)


@requires_cuda
def test_ih_accumulate_past_2_31(gpu_memory):
    """count*R*D passes 2**31 (Hessian-row offsets)."""
    from taylor_kernels.ops import ih_accumulate
    from taylor_kernels.reference.hessian import ih_accumulate as ref
    D, R = 2**20, 2
    count = 2**31 // (R * D) + 3
    x = torch.randn(1, D, device="cuda")
    bl = torch.randn(1, 1, D, device="cuda")
    w = torch.rand(count, device="cuda", dtype=torch.float64)
    h = torch.randn(count, R, D, device="cuda")
    idx = torch.tensor([3, D - 1], device="cuda")
    # the last 3 points alone, scattered into their own chunk, give the tail's contribution
    tail_w = torch.zeros_like(w)
    tail_w[-3:] = w[-3:]
    expect = ref(h[-3:], x, bl, tail_w, idx, count - 3)
    for name in _backends_on_gpu():
        with backends.using(name):
            got = ih_accumulate(h[-3:], x, bl, w, idx, count - 3)
            full = ih_accumulate(h, x, bl, tail_w, idx, 0)  # offsets past 2**31 in the kernel
        assert_close_ratio(got, expect, torch.float32)
        assert_close_ratio(full, expect, torch.float32)


def _pointer_products(path):
    """``(function, line)`` of every ``*`` in the pointer argument of a ``tl.load`` /
    ``tl.store`` of a ``@triton.jit`` function in ``path`` that is not inside ``off(...)``."""
    import ast

    def products(node, inside_off=False):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "off":
            inside_off = True
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) and not inside_off:
            yield node.lineno
        for child in ast.iter_child_nodes(node):
            yield from products(child, inside_off)

    tree = ast.parse(path.read_text())
    for fn in [n for n in tree.body if isinstance(n, ast.FunctionDef)]:
        if not any("jit" in ast.unparse(d) for d in fn.decorator_list):
            continue
        for call in ast.walk(fn):
            if isinstance(call, ast.Call) and ast.unparse(call.func) in ("tl.load", "tl.store"):
                for line in products(call.args[0]):
                    yield fn.name, line


def test_kernels_form_pointer_offsets_through_off():
    """Complements the probes above: no Triton kernel multiplies inside a load/store pointer
    except through ``off`` (an int32 product there would wrap past 2**31)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "taylor_kernels" / "triton"
    found = [(f.name, *hit) for f in sorted(root.glob("*.py")) for hit in _pointer_products(f)]
    assert found == []
