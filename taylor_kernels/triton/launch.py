"""Launching a Triton kernel from a ``triton_op`` body on every supported torch and Triton.

``torch.library.wrap_triton(kernel)[grid](...)`` makes a launch visible to ``torch.compile``
and ``make_fx``. Under ``TRITON_INTERPRET=1`` ``@triton.jit`` returns an ``InterpretedFunction``
instead of a ``JITFunction``: torch 2.13+ hands such a kernel back unwrapped, torch 2.11-2.12
raise ``RuntimeError("wrap_triton only works on functions annotated with triton.jit ...")``.
An interpreted kernel runs eagerly either way, so :func:`launcher` wraps compiled kernels only.
"""
from __future__ import annotations

from triton.runtime.jit import JITFunction
from torch.library import wrap_triton


def launcher(kernel):
    """``kernel`` ready for ``[grid](...)``: ``wrap_triton(kernel)`` for a compiled (GPU)
    kernel, the kernel itself for an interpreted one (CPU tensors, ``TRITON_INTERPRET=1``)."""
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel
