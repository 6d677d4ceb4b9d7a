"""Triton across the supported versions (torch 2.11-2.14, Triton 3.6-3.9): kernel launches and
the interpreter's known incompatibility, checked on any machine."""
from __future__ import annotations

import numpy
import pytest
import torch

import taylor_kernels as tk
from taylor_kernels import backends

triton = pytest.importorskip("triton")
from taylor_kernels.triton.launch import launcher  # noqa: E402

CPU = torch.device("cpu")


def _plain(x_ptr, n):
    pass


def test_launcher_wraps_compiled_kernels_only():
    """A ``JITFunction`` goes through ``wrap_triton`` (traceable); an interpreted kernel, which
    torch 2.11-2.12's ``wrap_triton`` rejects, is launched as it is, under the interpreter's
    lock."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    compiled = JITFunction(_plain)
    interpreted = InterpretedFunction(_plain)
    assert launcher(interpreted).kernel is interpreted
    wrapped = launcher(compiled).kernel  # (launched on its tensors' device)
    assert wrapped is compiled or type(wrapped).__name__ == "TraceableTritonKernelWrapper"


@pytest.fixture
def versions(monkeypatch):
    """Set the Triton and NumPy versions the interpreter check reads (cache cleared around)."""
    def set_versions(triton_version: str, numpy_version: str):
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        backends.triton_interpreter_problem.cache_clear()
    yield set_versions
    monkeypatch.undo()
    backends.triton_interpreter_problem.cache_clear()


@pytest.mark.parametrize("triton_version,numpy_version,broken", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False), ("3.9.0", "2.4.6", False), ("3.10.0", "3.0.0", False)])
def test_interpreter_problem_names_the_combination(versions, triton_version, numpy_version,
                                                   broken):
    versions(triton_version, numpy_version)
    problem = backends.triton_interpreter_problem()
    assert (problem is not None) == broken
    if broken:
        assert "numpy<2.4" in problem and "triton>=3.7" in problem


def test_broken_interpreter_makes_triton_unavailable_on_cpu(versions, monkeypatch):
    """Under ``TRITON_INTERPRET=1`` with Triton 3.6 and NumPy 2.4, forcing ``triton`` on CPU
    tensors raises with the reason instead of failing inside a kernel; CUDA is unaffected."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    versions("3.6.0", "2.4.6")
    assert not backends.runs_on("triton", CPU)
    assert backends.runs_on("triton", torch.device("cuda"))
    x = torch.randn(2, 5)
    with tk.backends.using("triton"), pytest.raises(RuntimeError, match="numpy<2.4"):
        tk.ops.path_points(x, torch.zeros(1, 1, 5), torch.linspace(0, 1, 3), 0, 6)
    versions("3.9.0", "2.4.6")
    assert backends.runs_on("triton", CPU)


def test_triton_needs_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backends.runs_on("triton", CPU)
    assert "TRITON_INTERPRET=1" in backends.unavailable_reason("triton", CPU)
