"""The completeness gap of given attributions: ``sum(attr) - (F(end) - F(start))`` per example.

What Captum's ``compute_convergence_delta`` reports for precomputed attributions of any shape
(input-space or layer-space: only the per-example sum is used).
"""
from __future__ import annotations

import torch

from taylor_kernels.attr.arguments import forward_args
from taylor_kernels.attr.layer import _baseline_inputs
from taylor_kernels.engine.problem import _target_rows, check_target, select_target


def _selected(model, points: tuple, args: tuple, targets) -> torch.Tensor:
    out = model(*points, *args)
    rows = torch.arange(points[0].shape[0], device=points[0].device)
    if targets is not None:
        check_target(targets, tuple(out.shape))
    return select_target(out, targets, rows)


@torch.no_grad()
def completeness_gap(model, attributions, start_point, end_point, target=None,
                     additional_forward_args=None) -> torch.Tensor:
    """``delta [B] = sum_j attr_j - (F(end) - F(start))`` with ``F`` the target output.

    Args:
        attributions: tensor or tuple of tensors, each ``[B, ...]``.
        start_point: None (zeros), a number, or tensors broadcastable to ``end_point`` (a
            tuple for tuple inputs); end_point: the inputs ``[B, ...]`` (any dtype).
        target, additional_forward_args: as for the attribution call.
    """
    ends = (end_point,) if isinstance(end_point, torch.Tensor) else tuple(end_point)
    attrs = (attributions,) if isinstance(attributions, torch.Tensor) else tuple(attributions)
    B = ends[0].shape[0]
    for i, a in enumerate(attrs):
        if a.dim() == 0 or a.shape[0] != B:
            raise ValueError(f"attributions {i} of shape {tuple(a.shape)} and end_point must "
                             f"match on the first (batch) dimension ({B})")
    args = forward_args(additional_forward_args)
    starts = _baseline_inputs(start_point, ends)
    targets = _target_rows(target, B, ends[0].device)
    f_start = _selected(model, starts, args, targets)  # (first, as Captum: a train-mode
    f_end = _selected(model, ends, args, targets)  # model's dropout draws in its order)
    total = sum(a.reshape(B, -1).sum(1) for a in attrs)
    return total - (f_end - f_start)  # (type promotion, as Captum's: float64 outputs stay)
