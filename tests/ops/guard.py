"""Guard regions around every buffer a kernel allocates, to catch out-of-bounds writes.

:class:`OutputGuard` is a ``TorchDispatchMode``. When one of our ops (namespace
``taylor_kernels``) is called under it, the op runs on its device kernel (C++, CUDA or the Triton
host wrapper) with the mode still active, so every ``empty``/``zeros`` the kernel allocates for
its output (or scratch) is served as a view into a larger buffer whose margins hold a sentinel
(NaN for floats, a fixed pattern for integers). :meth:`OutputGuard.check` then fails if any
margin changed: a store past the end (or before the start) of an output is caught here instead
of corrupting the heap silently. Outputs are still contiguous tensors of the requested shape;
only their storage is larger.
"""
from __future__ import annotations

import torch
from torch._C import DispatchKey, DispatchKeySet
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

MARGIN = 96  # elements each side: more than one Triton block row of a small tile
_INT_SENTINEL = 0x5A
_ALLOCATORS = {torch.ops.aten.empty.memory_format, torch.ops.aten.zeros.default}


def _device_key(args, kwargs) -> DispatchKey | None:
    """The backend key of an op call on real tensors (CUDA when any tensor lives there), or
    None for fake/meta tensors (opcheck, torch.compile tracing), which have no storage to guard."""
    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    if any(isinstance(t, FakeTensor) or t.is_meta for t in tensors):
        return None
    return DispatchKey.CUDA if any(t.is_cuda for t in tensors) else DispatchKey.CPU


class OutputGuard(TorchDispatchMode):
    """Serve allocations inside our ops from sentinel-bordered buffers; ``check()`` the borders."""

    def __init__(self, margin: int = MARGIN):
        super().__init__()
        self.margin = margin
        self.buffers: list[tuple[torch.Tensor, int, str]] = []
        self._inside_op = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = _device_key(args, kwargs) if func.namespace == "taylor_kernels" else None
        if key is not None:
            self._inside_op += 1
            try:
                with self:  # keep intercepting the kernel's own allocations
                    return func.redispatch(DispatchKeySet(key), *args, **kwargs)
            finally:
                self._inside_op -= 1
        if func in _ALLOCATORS and self._inside_op:
            return self._guarded(func, args, kwargs)
        return func(*args, **kwargs)

    def _guarded(self, func, args, kwargs) -> torch.Tensor:
        size = list(args[0])
        n = 1
        for s in size:
            n *= s
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        device = kwargs.get("device") or torch.device("cpu")
        if n == 0:
            return func(*args, **kwargs)
        fill = float("nan") if dtype.is_floating_point else _INT_SENTINEL
        buf = torch.full((n + 2 * self.margin,), fill, dtype=dtype, device=device)
        inner = buf[self.margin:self.margin + n]
        if func is torch.ops.aten.zeros.default:
            inner.zero_()
        self.buffers.append((buf, n, f"{func}{tuple(size)} {dtype}"))
        return inner.view(size)

    def check(self) -> None:
        """Raise ``AssertionError`` naming the allocation whose margins were written."""
        for buf, n, what in self.buffers:
            for name, part in (("before", buf[:self.margin]), ("after", buf[self.margin + n:])):
                if buf.is_floating_point():
                    intact = torch.isnan(part).all()
                else:
                    intact = (part == _INT_SENTINEL).all()
                assert bool(intact), f"out-of-bounds write {name} the output of {what}"
