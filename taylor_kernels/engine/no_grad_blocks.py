"""``torch.no_grad()`` blocks as constants in forward-mode AD, as in reverse mode.

Reverse mode records nothing inside a ``with torch.no_grad():`` block of the forward, so what
the block computes is a constant. PyTorch's forward mode (``torch.func.jvp``, dual tensors)
ignores grad mode: tangents flow through such a block, so a nested jvp gave another second
derivative than the Hessian of the same function (141.6 where the entry is 30.8 in a QA
case). :func:`respecting_no_grad` runs a function with grad mode on, under a torch-function
mode that turns forward gradients off for every op called while grad mode is off (the
block's), so the block's outputs carry no tangent at any nesting level. A view made in the
block would still take its base's tangent when read later (forward AD derives a view's
tangent from its base's lazily, and a detached alias is a view too), so views the block makes
are copied.

A caller that detaches the results anyway (``interactions``) asks for ``graph_free``: leaf
tensors that require grad (the parameters) then enter every op detached, so no autograd graph
is recorded beside the tangents (a BERT 4x256's order-3 sets held 817 MB of it, 118 MB
without).
"""
from __future__ import annotations

import functools

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only

from taylor_kernels.engine.guards import modules_of
from taylor_kernels.user_warnings import warn


def _copy_views(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t._is_view() else t


def _detach_leaves(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if t.requires_grad and t.is_leaf else t


class _NoGradCutsTangents(TorchFunctionMode):
    """Ops called with grad mode off run with forward gradients off (no tangent out);
    ``graph_free``: leaves that require grad enter every op detached."""

    def __init__(self, graph_free: bool):
        super().__init__()
        self.graph_free = graph_free

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.graph_free:
            args, kwargs = tree_map_only(torch.Tensor, _detach_leaves, (args, kwargs))
        if torch.is_grad_enabled() or not torch._C._is_fwd_grad_enabled() or \
                func is torch._C._set_grad_enabled:  # (the block's own switch)
            return func(*args, **kwargs)
        torch._C._set_fwd_grad_enabled(False)
        try:
            return tree_map_only(torch.Tensor, _copy_views, func(*args, **kwargs))
        finally:
            torch._C._set_fwd_grad_enabled(True)


def respecting_no_grad(fn, graph_free: bool = False):
    """``fn`` for ``torch.func.jvp``: every op inside a ``torch.no_grad()`` block of it cut
    from forward-mode AD (its result a constant, as for a backward). ``fn`` runs with grad
    mode on whatever the caller's: the blocks are told by it, and nested forward mode through
    SiLU needs it (under grad mode off a third-order jvp of a Llama raised "forward AD with
    aten::silu_backward" before). Reverse-mode transforms respect the blocks already.
    ``graph_free``: no autograd graph to the parameters (results not differentiable by
    them)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.enable_grad(), _NoGradCutsTangents(graph_free):
            return fn(*args, **kwargs)
    return run


def warn_if_backward_hooks(f, what: str) -> None:
    """A ``RuntimeWarning`` when a module ``f`` reaches (or a global hook) has backward
    hooks: forward-mode AD does not run them, so ``what`` gives the derivatives of the
    forward itself, where the reverse-mode calls (``hessian``, IG) take the hooks' changed
    gradients (a QA case: Hessian entry 0.0668 through a hook, mixed partial 0.0334)."""
    module = torch.nn.modules.module
    hooked = [type(m).__name__ for root in modules_of(f) for m in root.modules()
              if m._backward_hooks or m._backward_pre_hooks]
    if module._global_backward_hooks or module._global_backward_pre_hooks:
        hooked.append("global backward hooks")
    if hooked:
        warn(f"{what} runs in forward mode, where backward hooks do not run (on "
             f"{', '.join(sorted(set(hooked)))}): it gives the derivatives of the forward "
             "itself, not the gradients those hooks change (as tk.hessian and IG would)",
             RuntimeWarning)
