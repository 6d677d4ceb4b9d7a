"""The native extension ``taylor_kernels._C``: op registration (opcheck), C++ CPU kernels against
the reference (bitwise where the math allows), determinism, errors, CUDA kernels (GPU only) and
the CUDA compile check (``.ci/compile_cuda.sh``, when nvcc is on PATH)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taylor_kernels import _native, backends
from taylor_kernels.reference import path as ref
from tests.conftest import assert_close_ratio, requires_cuda

ROOT = Path(__file__).resolve().parents[2]
needs_ext = pytest.mark.skipif(not _native.has_cpp(),
                               reason=f"extension not built: {_native.LOAD_ERROR}")
needs_cuda_kernels = pytest.mark.skipif(not _native.has_cuda_kernels(),
                                        reason="extension built without CUDA kernels")
ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def ops():
    return torch.ops.taylor_kernels


def make(B, K, S, D, shared=False, dtype=torch.float32, per_point=False, device="cpu"):
    """x [B, D], baselines [1|B, K, D], nodes and weights [S] or [B, K, S] (float64)."""
    x = torch.randn(B, D, dtype=dtype, device=device)
    bl = torch.randn(1 if shared else B, K, D, dtype=dtype, device=device)
    shape = (B, K, S) if per_point else (S,)
    alphas = torch.rand(shape, dtype=torch.float64, device=device)
    weights = torch.rand(shape, dtype=torch.float64, device=device) / S
    return x, bl, alphas, weights


def chunks(total):
    return [(0, total), (total // 3, total - total // 3), (total - 1, 1), (1, max(0, total - 3))]


# ---- registration -------------------------------------------------------------------------

@needs_ext
def test_module_functions():
    assert _native._C.cpu_threads() == torch.get_num_threads()
    assert isinstance(_native._C.built_with_cuda(), bool)


@needs_ext
def test_built_with_cuda_matches_registered_kernels():
    """built_with_cuda() <=> both ops have a CUDA kernel; CPU kernels always (no GPU query)."""
    built = _native._C.built_with_cuda()
    for name in ("path_points", "path_accumulate"):
        qualname = f"taylor_kernels::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA") == built
    assert backends.available()["cuda"] == built
    if torch.version.cuda is None:
        assert not built, "CUDA kernels reported in an extension built against a CPU torch"


OPCHECK_CASES = [  # B, K, S, D, shared, dtype, per_point, start, count
    (2, 3, 4, 5, False, torch.float64, False, 3, 14),
    (3, 1, 5, 8, True, torch.float32, False, 0, 15),
    (2, 2, 3, 7, False, torch.float32, True, 2, 7),
    (1, 2, 2, 3, True, torch.float64, True, 0, 4),
]


@needs_ext
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"B{c[0]}K{c[1]}S{c[2]}D{c[3]}-"
                         f"{str(c[5])[6:]}{'-perpoint' if c[6] else ''}")
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck(case, requires_grad):
    B, K, S, D, shared, dtype, per_point, start, count = case
    x, bl, alphas, weights = make(B, K, S, D, shared, dtype, per_point)
    grads = torch.randn(count, D, dtype=dtype)
    if requires_grad:
        x, bl, alphas, weights, grads = (t.requires_grad_() for t in (x, bl, alphas, weights, grads))
    torch.library.opcheck(ops().path_points.default, (x, bl, alphas, start, count))
    torch.library.opcheck(ops().path_accumulate.default, (grads, x, bl, weights, start))


# ---- CPU kernels ----------------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 2, 5, 7, False), (2, 3, 4, 1030, True), (1, 1, 1, 1, True),
                                   (4, 2, 3, 9000, False)], ids=str)
def test_cpu_points_bitwise_equal_reference(dtype, shape):
    """Same arithmetic in the same order, no FMA, same rounding: equal bit for bit."""
    B, K, S, D, shared = shape
    x, bl, alphas, _ = make(B, K, S, D, shared, dtype)
    for start, count in chunks(B * K * S):
        got = ops().path_points(x, bl, alphas, start, count)
        want = ref.path_points(x, bl, alphas, start, count)
        assert got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, want)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_low_precision_rounding_special_values(dtype):
    """float -> bf16/fp16 stores and loads round like torch: ties, subnormals, overflow, inf, nan."""
    special = torch.tensor([0.0, -0.0, 1e-8, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 6.0e-5, 2.0 ** -14,
                            65504.0, 65519.99, 65520.0, 1e6, float("inf"), -float("inf"),
                            float("nan"), 1 / 3, 1.00048828125, 1.0 + 2.0 ** -8, 3.0e38, 1e-40])
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (20000,), dtype=torch.int32).view(torch.float32)
    values = torch.cat([special, torch.randn(20000) * torch.exp(torch.randn(20000) * 6), bits])
    S = values.numel()
    # x = 1, baseline = 0: path point s is alpha_s rounded to dtype
    x, bl = torch.ones(1, 1, dtype=dtype), torch.zeros(1, 1, 1, dtype=dtype)
    got = ops().path_points(x, bl, values, 0, S)
    want = ref.path_points(x, bl, values, 0, S)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)  # NaN payloads may differ (ours: the quiet NaN)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    # loads: grads in dtype, weight 1, x - baseline = 1: out = 0 + grads in float32
    g = values.to(dtype).view(1, S)
    args = (g, torch.ones(1, S, dtype=dtype), torch.zeros(1, 1, S, dtype=dtype), torch.ones(1), 0)
    got, want = ops().path_accumulate(*args), ref.path_accumulate(*args)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


@needs_ext
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("per_point", [False, True], ids=["shared_rule", "perpoint"])
@pytest.mark.parametrize("shape", [(3, 2, 5, 7, False), (2, 3, 70, 2051, True), (5, 1, 7, 33, False)],
                         ids=str)
def test_cpu_accumulate_matches_reference(dtype, per_point, shape):
    B, K, S, D, shared = shape
    x, bl, _, weights = make(B, K, S, D, shared, dtype, per_point)
    for start, count in chunks(B * K * S):
        grads = torch.randn(count, D, dtype=dtype)
        got = ops().path_accumulate(grads, x, bl, weights, start)
        want = ref.path_accumulate(grads, x, bl, weights, start)
        assert got.dtype == want.dtype and got.shape == (B, D)
        assert_close_ratio(got, want, torch.float64 if dtype == torch.float64 else torch.float32)


@needs_ext
def test_cpu_mixed_dtypes_and_strided_inputs():
    """x bf16 with float32 baselines / float64 grads, transposed baselines: as the reference."""
    B, K, S, D = 3, 2, 4, 37
    x = torch.randn(B, 2 * D, dtype=torch.bfloat16)[:, ::2]
    bl = torch.randn(B, D, K).transpose(1, 2)
    alphas = torch.rand(2 * S)[::2]
    grads = torch.randn(2 * B * K * S, D, dtype=torch.float64)[::2]
    got = ops().path_points(x, bl, alphas, 2, 17)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref.path_points(x, bl, alphas, 2, 17))
    got = ops().path_accumulate(grads, x, bl, alphas, 0)
    assert got.dtype == torch.float32
    assert_close_ratio(got, ref.path_accumulate(grads, x, bl, alphas, 0), torch.float32)


@needs_ext
@pytest.mark.parametrize("seed", range(3))
def test_cpu_accumulate_of_many_steps_stays_near_a_float64_sum(seed):
    """4096 same-sign float32 steps: one running sum of w g (x - b) drifted to 2-3.5e-6 of a
    float64 sum (500-step IG 70x further from float64 than Captum's pairwise torch.sum); the
    cascade of 32-row partials times (x - b) per run stays near 5e-7."""
    g = torch.Generator().manual_seed(seed)
    B, S, D = 2, 4096, 64
    grads = torch.rand(B * S, D, generator=g) + 0.5
    x, bl = torch.randn(B, D, generator=g), torch.randn(1, 1, D, generator=g)
    w = torch.full((S,), 1.0 / S)
    want = (grads.double().view(B, S, D) * w.double()[None, :, None]).sum(1) * (
        x.double() - bl.double()[:, 0])
    got = ops().path_accumulate(grads, x, bl, w, 0)
    assert float(((got.double() - want).abs() / want.abs()).max()) < 1e-6


def test_reference_accumulate_rounds_once():
    """The pure-PyTorch reference, the truth the kernels are tested against, summed in
    sequence in float32 (``index_add``): 2-3e-6 off a float64 sum after 4096 steps, more than
    the C++ kernel. It sums in float64 now and rounds once."""
    g = torch.Generator().manual_seed(0)
    B, S, D = 2, 4096, 64
    grads = torch.rand(B * S, D, generator=g) + 0.5
    x, bl = torch.randn(B, D, generator=g), torch.randn(1, 1, D, generator=g)
    w = torch.full((S,), 1.0 / S)
    want = (grads.double().view(B, S, D) * w.double()[None, :, None]).sum(1) * (
        x.double() - bl.double()[:, 0])
    got = ref.path_accumulate(grads, x, bl, w, 0)
    assert got.dtype == torch.float32
    assert float(((got.double() - want).abs() / want.abs()).max()) < 2 ** -23


@needs_ext
def test_cpu_accumulate_deterministic_across_threads():
    """Fixed summation order: bitwise the same result twice and for any thread count."""
    x, bl, _, w = make(4, 3, 40, 5000, False, torch.float32)
    grads = torch.randn(4 * 3 * 40 - 50, 5000)
    first = ops().path_accumulate(grads, x, bl, w, 25)
    assert torch.equal(first, ops().path_accumulate(grads, x, bl, w, 25))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(first, ops().path_accumulate(grads, x, bl, w, 25))
    finally:
        torch.set_num_threads(before)


@needs_ext
def test_cpu_empty_and_zero_width():
    x, bl, alphas, w = make(2, 2, 3, 5, True)
    assert ops().path_points(x, bl, alphas, 12, 0).shape == (0, 5)
    out = ops().path_accumulate(torch.empty(0, 5), x, bl, w, 12)
    assert out.shape == (2, 5) and not out.any()
    x0, bl0 = torch.empty(2, 0), torch.empty(1, 2, 0)
    assert ops().path_points(x0, bl0, alphas, 0, 12).shape == (12, 0)
    assert ops().path_accumulate(torch.empty(12, 0), x0, bl0, w, 0).shape == (2, 0)


@needs_ext
@pytest.mark.parametrize("bad", ["x_dims", "baseline_batch", "baseline_width", "range", "negative",
                                 "perpoint_shape", "grads_width", "int_dtype"])
def test_cpu_bad_arguments_raise_clearly(bad):
    x, bl, alphas, w = make(2, 2, 3, 5)
    error = TypeError if bad == "int_dtype" else ValueError
    with pytest.raises(error, match="path_"):
        if bad == "x_dims":
            ops().path_points(x[0], bl, alphas, 0, 1)
        elif bad == "baseline_batch":
            ops().path_points(x, torch.randn(3, 2, 5), alphas, 0, 1)
        elif bad == "baseline_width":
            ops().path_points(x, torch.randn(2, 2, 4), alphas, 0, 1)
        elif bad == "range":
            ops().path_points(x, bl, alphas, 10, 3)
        elif bad == "negative":
            ops().path_accumulate(torch.randn(1, 5), x, bl, w, -1)
        elif bad == "perpoint_shape":
            ops().path_points(x, bl, torch.rand(2, 3, 3), 0, 1)
        elif bad == "grads_width":
            ops().path_accumulate(torch.randn(3, 4), x, bl, w, 0)
        else:
            ops().path_points(x.long(), bl, alphas, 0, 1)


# A child process: loads _C alone (no package import) under ATEN_CPU_CAPABILITY, runs every CPU
# op on the parent's inputs (odd widths: vector tails; strided inputs; all dtypes; made in the
# parent because torch.randn's own kernels differ between capabilities), saves the results.
CAPABILITY_CHILD = r"""
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("taylor_kernels._C", sys.argv[1])
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
ops = torch.ops.taylor_kernels
inp = torch.load(sys.argv[2])
out = {"capability": C.cpu_capability()}
w, gamma = inp["w"], inp["gamma"]
for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    x, bl, g, u, c = (inp[k].to(dt) for k in ("x", "bl", "g", "u", "c"))
    u, c = u.t(), c.transpose(1, 2)
    out[f"path_points {dt}"] = ops.path_points(x, bl, w, 1, 27)
    out[f"path_accumulate {dt}"] = ops.path_accumulate(g, x, bl, w[0, 0], 1)
    out[f"jet_unary {dt}"] = torch.stack([ops.jet_unary(u, fn) for fn in (0, 5, 7)])
    out[f"jet_mul {dt}"] = ops.jet_mul(u, u.flip(1))
    out[f"polarize {dt}"] = [ops.polarize_contract(t, gamma, 2) for t in (c, c.contiguous())]
out["ih_accumulate"] = ops.ih_accumulate(inp["h"], inp["x"], inp["bl"][:1], w, inp["index"], 4)
torch.save(out, sys.argv[3])
"""


@needs_ext
def test_cpu_capabilities_agree(tmp_path):
    """The kernels of every CPU capability this machine runs (DEFAULT, AVX2, AVX512: picked
    like ATen's, so ATEN_CPU_CAPABILITY selects them) give bitwise the same results; jet_unary
    only to rounding (its order-0 seeds come from ATen's own per-capability math)."""
    order = ["DEFAULT", "AVX2", "AVX512"]
    best = torch.backends.cpu.get_cpu_capability()
    caps = order[:order.index(best) + 1] if best in order else ["DEFAULT"]
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.randn(2, 1037, generator=g), "bl": torch.randn(2, 3, 1037, generator=g),
                "w": torch.rand(2, 3, 5, generator=g, dtype=torch.float64),
                "g": torch.randn(29, 1037, generator=g), "u": torch.randn(1037, 5, generator=g) / 2,
                "c": torch.randn(3, 1037, 7, generator=g),
                "gamma": torch.rand(7, generator=g, dtype=torch.float64),
                "h": torch.randn(23, 4, 1037, generator=g), "index": torch.tensor([0, 5, 1036, 5])},
               tmp_path / "inputs")
    procs = {cap: subprocess.Popen(
        [sys.executable, "-c", CAPABILITY_CHILD, _native._C.__file__, str(tmp_path / "inputs"),
         str(tmp_path / cap)], env={**os.environ, "ATEN_CPU_CAPABILITY": cap.lower()},
        stderr=subprocess.PIPE, text=True) for cap in caps}
    for cap, proc in procs.items():
        assert proc.wait(timeout=240) == 0, proc.stderr.read()[-4000:]
    base = torch.load(tmp_path / "DEFAULT")
    base.pop("capability")
    for cap in caps:
        got = torch.load(tmp_path / cap)
        assert got.pop("capability") == cap
        for key, want in base.items():
            if key.startswith("jet_unary"):
                torch.testing.assert_close(got[key], want)
            else:
                assert all(map(torch.equal, got[key], want)) if isinstance(want, list) \
                    else torch.equal(got[key], want), (cap, key)


# ---- CUDA kernels (GPU machines only) --------------------------------------------------------

CUDA_SHAPES = [  # B, K, S, D, shared: odd widths (scalar path), multiples of 8 (16-byte vectors),
    (1, 1, 1, 1, True), (3, 2, 5, 7, False), (2, 3, 4, 129, True), (5, 1, 7, 33, False),
    (4, 3, 70, 256, False), (2, 2, 300, 64, True), (3, 2, 9, 4096, False)]  # many rows: splits


@requires_cuda
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("per_point", [False, True], ids=["shared_rule", "perpoint"])
def test_cuda_matches_reference(dtype, shape, per_point):
    B, K, S, D, shared = shape
    x, bl, alphas, w = make(B, K, S, D, shared, dtype, per_point, device="cuda")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for start, count in chunks(B * K * S):
        got = ops().path_points(x, bl, alphas, start, count)
        assert got.device.type == "cuda" and got.dtype == dtype
        assert_close_ratio(got, ref.path_points(x, bl, alphas, start, count), dtype)
        grads = torch.randn(count, D, dtype=dtype, device="cuda")
        got = ops().path_accumulate(grads, x, bl, w, start)
        assert got.dtype == acc
        assert_close_ratio(got, ref.path_accumulate(grads, x, bl, w, start), acc)


@requires_cuda
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_deterministic_and_misaligned(dtype):
    """Bitwise equal twice; a storage offset of one element takes the scalar (unvectorized) path."""
    B, K, S, D = 3, 2, 150, 512
    x, bl, alphas, w = make(B, K, S, D, False, dtype, device="cuda")
    grads = torch.randn(B * K * S * D + 1, dtype=dtype, device="cuda")[1:].view(B * K * S, D)
    first = ops().path_accumulate(grads, x, bl, w, 0)
    assert torch.equal(first, ops().path_accumulate(grads, x, bl, w, 0))
    assert_close_ratio(first, ref.path_accumulate(grads, x, bl, w, 0), torch.float32)
    aligned = grads.clone()
    assert_close_ratio(ops().path_accumulate(aligned, x, bl, w, 0),
                       ref.path_accumulate(aligned, x, bl, w, 0), torch.float32)
    pts = ops().path_points(x, bl, alphas, 5, 700)
    assert torch.equal(pts, ops().path_points(x, bl, alphas, 5, 700))
    assert_close_ratio(pts, ref.path_points(x, bl, alphas, 5, 700), dtype)


@requires_cuda
@needs_cuda_kernels
def test_cuda_empty_chunk_and_device_mismatch():
    x, bl, alphas, w = make(2, 2, 3, 5, True, device="cuda")
    assert ops().path_points(x, bl, alphas, 4, 0).shape == (0, 5)
    out = ops().path_accumulate(torch.empty(0, 5, device="cuda"), x, bl, w, 4)
    assert out.shape == (2, 5) and not out.any()
    with pytest.raises(RuntimeError, match="same device"):
        ops().path_points(x, bl, alphas.cpu(), 0, 1)


# ---- CUDA compile check ----------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.skipif(os.environ.get("TAYLOR_KERNELS_SKIP_CUDA_COMPILE_TEST") == "1",
                    reason="TAYLOR_KERNELS_SKIP_CUDA_COMPILE_TEST=1 (checked by a separate step)")
def test_cuda_sources_compile():
    """nvcc compiles every csrc/cuda/*.cu for sm_80 and sm_90 (about 40 s on 2 cores)."""
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "compile_cuda.sh")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "file(s) OK" in proc.stdout
