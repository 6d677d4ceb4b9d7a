"""Elementwise activations whose derivative is computed once per forward, for many backwards.

A generation's serial backward (:mod:`taylor_kernels.attr.generation`, CPU) runs ``T`` passes
over one graph, one per target token. Each pass through an activation ``y = g(x)`` rebuilds
``g'(x)`` from the saved tensors: GPT-2's tanh GELU (``NewGELUActivation``) costs about seven
elementwise ops on ``[N, L, 4d]`` per layer per pass, 18% of a ~97M GPT-2's generation call
(measured with the profiler: ``mul``, ``pow``, ``tanh_backward``, ``add_``). Within
:func:`cached_derivatives`, the output of every known elementwise activation module goes
through :class:`ScaledGrad`, whose backward is the one product ``grad * g'(x)``; ``g'(x)``
is computed in the forward by one backward pass of the activation's own graph with a
gradient of ones (exact for an elementwise function, autograd's own derivative, no formula
per activation; the pass stops at the activation's input). It also saves one tensor per
activation where autograd saved several.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from taylor_kernels.engine.thread_hooks import this_thread
from taylor_kernels.models.module_kinds import runs_torch_forward

# elementwise by definition (transformers' classes matched by name: transformers is optional)
TORCH_ELEMENTWISE = (nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.ELU, nn.CELU,
                     nn.SELU, nn.Softplus, nn.Hardswish, nn.LogSigmoid)
TRANSFORMERS_ELEMENTWISE = {"NewGELUActivation", "GELUActivation", "FastGELUActivation",
                            "QuickGELUActivation", "GELUTanh", "PytorchGELUTanh",
                            "AccurateGELUActivation", "SiLUActivation", "MishActivation"}


def is_elementwise(module: nn.Module) -> bool:
    """Whether ``module`` is a known elementwise activation (``y_i = g(x_i)``: torch's own
    forward, or a ``transformers`` activation by name) without hooks of its own (a hook, or a
    subclass's forward, could make it something else)."""
    known = (isinstance(module, TORCH_ELEMENTWISE) and runs_torch_forward(module)) or (
        type(module).__name__ in TRANSFORMERS_ELEMENTWISE
        and type(module).__module__.startswith("transformers."))
    return known and not (module._forward_hooks or module._forward_pre_hooks)


class ScaledGrad(torch.autograd.Function):
    """``y = ScaledGrad.apply(x, y_value, dydx)``: a copy of ``y_value`` in the forward,
    ``grad * dydx`` to ``x`` in the backward (``dydx`` shaped like ``x``). The copy is what
    lets the model modify ``y`` in place afterwards: an input returned as-is would come back as
    a view, and autograd forbids in-place changes to a custom Function's views."""

    @staticmethod
    def forward(ctx, x, y_value, dydx):
        ctx.save_for_backward(dydx)
        return y_value.clone()

    @staticmethod
    def backward(ctx, grad):
        (dydx,) = ctx.saved_tensors
        return grad * dydx, None, None


# Dtypes routed: in bf16/fp16 ``grad * g'(x)`` rounds ``g'(x)`` and then the product, where
# autograd's activation backward computes in float32 and rounds once (a bf16 GELU's gradient
# 1.5e-2 off float32 against autograd's 7.8e-3; a bf16 GPT-NeoX generation's attributions
# 1.1e-2 against 5.5e-3, QA 2026-12-01): low precision keeps autograd's own backward.
CACHED_DTYPES = (torch.float32, torch.float64)


def _through_scaled_grad(module: nn.Module, inputs: tuple, output):
    """Forward hook: ``output`` again, with :class:`ScaledGrad` as its backward."""
    x = inputs[0] if len(inputs) == 1 else None
    if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor)
            and torch.is_grad_enabled() and x.requires_grad and x.dtype in CACHED_DTYPES
            and output.grad_fn is not None and output.shape == x.shape):
        return None
    # g'(x) = d(sum y)/dx, elementwise: the activation's nodes once (no model hook runs)
    (dydx,) = torch.autograd.grad(output, x, torch.ones_like(output))
    return ScaledGrad.apply(x, output.detach(), dydx)


@contextlib.contextmanager
def cached_derivatives(model: nn.Module):
    """Within the block, forwards of ``model`` route each elementwise activation's gradient
    through :class:`ScaledGrad` (derivative computed once per forward, by one backward of the
    activation's own graph, which is then dropped); hooks removed on exit. Nothing is routed
    while a global forward hook is registered (it could rewrite an activation's output, which
    ``g'(x)`` would then not describe)."""
    use = not nn.modules.module._global_forward_hooks
    handles = [m.register_forward_hook(this_thread(_through_scaled_grad)) for m in model.modules()
               if use and is_elementwise(m)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
