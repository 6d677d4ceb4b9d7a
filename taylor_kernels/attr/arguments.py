"""Argument forms shared by the attribution functions (Captum's conventions)."""
from __future__ import annotations

import torch

from taylor_kernels.engine.problem import inputs_error
from taylor_kernels.engine.row_args import forward_args  # noqa: F401  (re-exported)


def inputs_tuple(inputs) -> tuple[torch.Tensor, ...]:
    """A tensor or a non-empty tuple of tensors (any dtype) as a tuple."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    tup = tuple(inputs) if isinstance(inputs, (tuple, list)) else ()
    if not tup or not all(isinstance(t, torch.Tensor) for t in tup):
        raise inputs_error(inputs)
    return tup


def refuse_create_graph(name: str, kwargs: dict) -> None:
    """``ValueError`` for ``create_graph=True`` among a layer or token method's IG arguments:
    the activations at the inputs and baselines are captured without a graph, so the
    attributions' graph reached only the parameters after the layer (the layer's own and
    earlier ones, and the inputs, got no gradient, silently: a DAPr penalty skipped them)."""
    if kwargs.get("create_graph"):
        raise ValueError(f"{name} does not support create_graph=True: its graph would miss "
                         "the layer's own and earlier parameters and the inputs (the "
                         "activations at the inputs and baselines are captured without one); "
                         "for differentiable attributions call integrated_gradients on the "
                         "layer's input computed with grad (e.g. the embeddings)")
