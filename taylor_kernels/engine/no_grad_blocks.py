"""``torch.no_grad()`` blocks as constants in forward-mode AD, as in reverse mode.

Reverse mode records nothing inside a ``with torch.no_grad():`` block of the forward, so what
the block computes is a constant. PyTorch's forward mode (``torch.func.jvp``, dual tensors)
ignores grad mode: tangents flow through such a block, so a nested jvp gave another second
derivative than the Hessian of the same function (141.6 where the entry is 30.8 in a QA
case). :func:`respecting_no_grad` runs a function under a torch-function mode that turns
forward gradients off for every op called while grad mode is off, so the block's outputs
carry no tangent at any nesting level.
"""
from __future__ import annotations

import functools

import torch
from torch.overrides import TorchFunctionMode


class _NoGradCutsTangents(TorchFunctionMode):
    """Ops called with grad mode off run with forward gradients off (no tangent out)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled() or not torch._C._is_fwd_grad_enabled():
            return func(*args, **kwargs)
        torch._C._set_fwd_grad_enabled(False)
        try:
            return func(*args, **kwargs)
        finally:
            torch._C._set_fwd_grad_enabled(True)


def respecting_no_grad(fn):
    """``fn`` run with grad mode on and every op inside a ``torch.no_grad()`` block of it cut
    from forward-mode AD (its result a constant, as for a backward). For functions that
    ``torch.func.jvp`` differentiates; reverse-mode transforms already respect the blocks."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.enable_grad(), _NoGradCutsTangents():
            return fn(*args, **kwargs)
    return run
