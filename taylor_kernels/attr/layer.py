"""Layer Integrated Gradients: IG in the space of a module's output (or input).

``LIG_j = (a_j(x) - a_j(b)) int_0^1 d f / d a_j (a(b) + t (a(x) - a(b))) dt`` where ``a`` is the
layer's activation. Activations at the inputs and baselines are captured once; path points
are built in activation space by the path ops and fed to the model through a forward hook
that replaces the layer's output (or input), so chunking, memory budget and every quadrature
rule (adaptive included) come from :func:`integrated_gradients`. The network before the layer
still runs for every path point (as in Captum): its output is overwritten by the hook.
"""
from __future__ import annotations

from typing import Callable

import torch

from taylor_kernels.attr.integrated_gradients import AttributionResult, integrated_gradients
from taylor_kernels.engine.problem import as_tuple


def _activation(model, layer, inputs: tuple, args: tuple, of_input: bool) -> torch.Tensor:
    """Run the model once (no grad) and return the layer's output (or first input)."""
    seen: list = []

    def grab(module, inp, out=None):
        seen.append(inp[0] if of_input else out)

    hook = (layer.register_forward_pre_hook(grab) if of_input
            else layer.register_forward_hook(grab))
    try:
        with torch.no_grad():
            model(*inputs, *args)
    finally:
        hook.remove()
    if not seen:
        raise ValueError(f"layer {type(layer).__name__} was not called by the model's forward")
    if not isinstance(seen[0], torch.Tensor):
        raise ValueError(f"layer {type(layer).__name__} {'input' if of_input else 'output'} is a "
                         f"{type(seen[0]).__name__}; layer attribution needs a single tensor")
    return seen[0].detach()


def _baseline_inputs(baselines, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Input-space baselines expanded to the batch (None = zeros, numbers, tensors)."""
    bls = baselines if isinstance(baselines, tuple) else (baselines,) * len(inputs)
    if len(bls) != len(inputs):
        raise ValueError(f"{len(bls)} baselines for {len(inputs)} inputs")
    out = []
    for i, (b, x) in enumerate(zip(bls, inputs)):
        if b is None or isinstance(b, (int, float)):
            out.append(torch.full_like(x, 0 if b is None else b))
            continue
        try:
            out.append(b.to(device=x.device, dtype=x.dtype).expand_as(x))
        except RuntimeError as exc:
            raise ValueError(f"baseline {i} of shape {tuple(b.shape)} does not broadcast to "
                             f"input {i} of shape {tuple(x.shape)}") from exc
    return tuple(out)


def layer_replaced_forward(model: Callable, layer: torch.nn.Module, of_input: bool) -> Callable:
    """``g(points, *inputs, *args) = model(*inputs, *args)`` with ``layer``'s output (or first
    input, when ``of_input``) replaced by ``points``; inputs and args are passed through."""
    def through_layer(points, *rest):
        def replace_out(module, inp, out):
            return points

        def replace_in(module, inp):
            return (points,) + tuple(inp[1:])

        hook = (layer.register_forward_pre_hook(replace_in) if of_input
                else layer.register_forward_hook(replace_out))
        try:
            return model(*rest)
        finally:
            hook.remove()

    return through_layer


def layer_integrated_gradients(model, layer: torch.nn.Module, inputs, baselines=None,
                               target=None, *, attribute_to_layer_input: bool = False,
                               additional_forward_args=None, **ig_kwargs) -> AttributionResult:
    """IG with respect to ``layer``'s output (default) or input.

    Args:
        model: callable ``model(*inputs, *additional_forward_args)``; inputs may be any dtype
            (e.g. token ids: attribute to the embedding layer).
        layer: a module called once in the forward; its output (input) must be one tensor.
        baselines: input-space baselines (None = zeros, a number, or a tensor broadcastable to
            the inputs; a tuple for tuple inputs), mapped through the network to the layer.
        ig_kwargs: ``steps``, ``rule``, ``tol``, ``max_memory``, ``chunk_size``, ``backend``,
            ``progress``: as :func:`integrated_gradients`.
    Returns:
        :class:`AttributionResult` with attributions shaped like the layer activation
        ``[B, ...]``; ``gap = sum(attr) - (f(x) - f(b))``.
    """
    tup, _ = as_tuple(inputs) if not isinstance(inputs, torch.Tensor) or inputs.is_floating_point() \
        else ((inputs,), False)
    fargs = (() if additional_forward_args is None else additional_forward_args
             if isinstance(additional_forward_args, tuple) else (additional_forward_args,))
    act_x = _activation(model, layer, tup, fargs, attribute_to_layer_input)
    act_b = _activation(model, layer, _baseline_inputs(baselines, tup), fargs,
                        attribute_to_layer_input)
    through_layer = layer_replaced_forward(model, layer, attribute_to_layer_input)
    return integrated_gradients(through_layer, act_x, act_b, target,
                                additional_forward_args=tup + tuple(fargs), **ig_kwargs)
