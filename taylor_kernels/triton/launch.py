"""Launching a Triton kernel from a ``triton_op`` body on every supported torch and Triton.

``torch.library.wrap_triton(kernel)[grid](...)`` makes a launch visible to ``torch.compile``
and ``make_fx``. Under ``TRITON_INTERPRET=1`` ``@triton.jit`` returns an ``InterpretedFunction``
instead of a ``JITFunction``: torch 2.13+ hands such a kernel back unwrapped, torch 2.11-2.12
raise ``RuntimeError("wrap_triton only works on functions annotated with triton.jit ...")``.
An interpreted kernel runs eagerly either way, so :func:`launcher` wraps compiled kernels only;
interpreted launches hold one process-wide lock (:class:`_Serialized`).
"""
from __future__ import annotations

import threading

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

_INTERPRETER_LOCK = threading.Lock()
_TRACED = (FakeTensor, FunctionalTensor)  # a tracer's stand-ins: no device to switch to


class _Serialized:
    """An interpreted kernel whose launches hold one process-wide lock: Triton's interpreter
    keeps a launch's state (grid, program ids) in globals, and two threads' launches broke
    each other (``InterpreterError: x >= grid_dim[0]`` in 1-3 of 40 calls)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _INTERPRETER_LOCK:
                return self.kernel[grid](*args, **kwargs)
        return launch


class _OnTheTensorsDevice:
    """A compiled kernel (``wrap_triton``) launched on its first tensor argument's device.
    Triton launches on the current device and its current stream: with tensors on
    ``cuda:1`` while ``cuda:0`` is current, the kernel ran on device 0 against device 1's
    memory. Only real CUDA tensors take the guard (not while ``torch.compile`` traces, nor
    its fake tensors: Inductor guards the device itself)."""

    def __init__(self, kernel):
        self.kernel = wrap_triton(kernel)

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            device = None if torch.compiler.is_compiling() else launch_device(args)
            if device is None:
                return launch(*args, **kwargs)
            with torch.cuda.device(device):
                return launch(*args, **kwargs)
        return run


def launch_device(args) -> torch.device | None:
    """The device to make current for a launch: the first real CUDA tensor's among ``args``
    when it is not the current device, else None (nothing to change)."""
    for a in args:
        if isinstance(a, torch.Tensor) and not isinstance(a, _TRACED) and a.is_cuda:
            return a.device if a.device.index != torch.cuda.current_device() else None
    return None


def launcher(kernel):
    """``kernel`` ready for ``[grid](...)``: for a compiled (GPU) kernel, ``wrap_triton``
    launched on its tensors' device; an interpreted one (CPU tensors, ``TRITON_INTERPRET=1``)
    launched under a lock."""
    return _OnTheTensorsDevice(kernel) if isinstance(kernel, JITFunction) else \
        _Serialized(kernel)
