"""Argument forms shared by the attribution functions (Captum's conventions)."""
from __future__ import annotations

import torch


def forward_args(additional_forward_args) -> tuple:
    """Additional forward args as a tuple: None -> ``()``, a tuple as is, else a 1-tuple."""
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def inputs_tuple(inputs) -> tuple[torch.Tensor, ...]:
    """A tensor or a non-empty tuple of tensors (any dtype) as a tuple."""
    tup = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not tup or not all(isinstance(t, torch.Tensor) for t in tup):
        raise ValueError("inputs must be a tensor or a non-empty tuple of tensors")
    return tup
