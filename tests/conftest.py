"""Shared fixtures: device gating, backend parametrisation, one tolerance rule per dtype."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk

# One tolerance per dtype (relative error ratio rms(out - ref) / rms(ref)).
RATIO_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def error_ratio(out: torch.Tensor, ref: torch.Tensor) -> float:
    """rms(out - ref) / rms(ref), computed in float64 (0 when both are zero or empty)."""
    if out.numel() == 0 and ref.numel() == 0:
        return 0.0
    out, ref = out.double(), ref.double()
    denom = ref.pow(2).mean().sqrt().item()
    num = (out - ref).pow(2).mean().sqrt().item()
    return num / denom if denom > 0 else num


def assert_close_ratio(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Fail unless ``out`` matches ``ref`` within the dtype's error-ratio tolerance."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in output"
    ratio = error_ratio(out, ref)
    assert ratio <= RATIO_TOL[dtype], f"error ratio {ratio:.3e} > {RATIO_TOL[dtype]:.1e}"


def runnable_cpu_backends() -> list[str]:
    return [n for n in tk.backends.NAMES if tk.backends.runs_on(n, torch.device("cpu"))]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_interpreted_triton = pytest.mark.skipif(
    not tk.backends.runs_on("triton", torch.device("cpu")),
    reason=f"Triton on CPU tensors: {tk.backends.unavailable_reason('triton', torch.device('cpu'))}")


@pytest.fixture(params=["reference", "cpp", "triton"])
def cpu_backend(request):
    """Each backend that can run on CPU tensors here, forced for the test's duration."""
    name = request.param
    if not tk.backends.runs_on(name, torch.device("cpu")):
        reason = ("extension not built" if name == "cpp" else
                  tk.backends.unavailable_reason(name, torch.device("cpu")))
        pytest.skip(f"backend {name} unavailable: {reason}")
    with tk.backends.using(name):
        yield name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
