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

from triton.runtime.jit import JITFunction
from torch.library import wrap_triton

_INTERPRETER_LOCK = threading.Lock()


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


def launcher(kernel):
    """``kernel`` ready for ``[grid](...)``: ``wrap_triton(kernel)`` for a compiled (GPU)
    kernel; an interpreted one (CPU tensors, ``TRITON_INTERPRET=1``) launched under a lock."""
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else _Serialized(kernel)
