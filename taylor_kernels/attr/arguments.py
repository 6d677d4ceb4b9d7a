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
