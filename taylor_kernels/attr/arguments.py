"""Argument forms shared by the attribution functions (Captum's conventions)."""
from __future__ import annotations

import torch

from taylor_kernels.engine.row_args import forward_args  # noqa: F401  (re-exported)


def inputs_tuple(inputs) -> tuple[torch.Tensor, ...]:
    """A tensor or a non-empty tuple of tensors (any dtype) as a tuple."""
    tup = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not tup or not all(isinstance(t, torch.Tensor) for t in tup):
        raise ValueError("inputs must be a tensor or a non-empty tuple of tensors")
    return tup
