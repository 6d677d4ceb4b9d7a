"""Drawn references built and integrated a group at a time, within the memory budget.

Expected gradients and Shapley IG average IG over ``M`` references per input; held at once
they are ``[B, M, D]``, which can take most of a budget (a CNN's 8 inputs with 64 EG
references: 6.3 MB, beside an 8 MB budget the call then overran by 14%; at 4 MB it could not
run), and on large inputs most of the machine (32 images of 224x224x3 with 100 references:
1.9 GB). The attributions are the mean over references, so groups of ``m`` references
integrate one after another: ``A = sum_g (m_g / M) A_g``, the endpoint outputs ``f(b)`` of
each group kept (``[B, M]``, small). Groups hold at most ``REFERENCE_SHARE`` of the budget
(the default budget too: a fraction of the free memory).
"""
from __future__ import annotations

from typing import Callable

import torch

from taylor_kernels.engine import memory, path_engine

# Share of the budget the references of one group may take: the rest is the path's chunks,
# endpoint forwards and what the call holds (inputs, sums).
REFERENCE_SHARE = 0.25


def group_size(problem, M: int, max_memory) -> int:
    """References per group: all ``M`` when their ``[B, M, D]`` fits ``REFERENCE_SHARE`` of
    the budget (``max_memory``, or the default), else the fewest groups of equal size (the
    last one smaller) that fit: each new group size probes its chunk cost again."""
    x = problem.x
    per_reference = max(1, problem.B * x.shape[1] * x.element_size())
    budget = memory.parse_budget(max_memory, x.device)
    fit = max(1, min(M, int(REFERENCE_SHARE * budget // per_reference)))
    groups = -(-M // fit)
    return -(-M // groups)


def integrate_groups(problem, M: int, build: Callable, integrate: Callable, max_memory,
                     endpoints: bool = True):
    """Run ``integrate`` over groups of the ``M`` references ``build`` makes (``endpoints``
    False: without the forwards of the inputs and references that a gap needs, ``fx`` and
    ``fb`` None throughout, as Captum's GradientShap without a delta).

    Args: ``build(m0, m1) -> [B, m1 - m0, D]`` references ``m0..m1-1`` of every input (set as
    ``problem.baselines`` while their group runs); ``integrate(fx, fb, m0, m1) -> (sums [B, D],
    evaluations, nodes_per_input [B] or None, regions [B, m] or None)`` for that group, its
    sums being the mean over the group's references (the path engine's ``/ K``).
    Returns: ``(sums [B, D], evaluations, nodes_per_input, regions [B, M] or None, fx [B],
    fb [B, M])`` (``fx``, ``fb`` None without ``endpoints``): sums the mean over all ``M`` references; regions None if any group's is.
    """
    size = group_size(problem, M, max_memory)
    total, evaluations, used, regions, fbs, fx = None, 0, None, [], [], None
    for m0 in range(0, M, size):
        m1 = min(M, m0 + size)
        problem.baselines = build(m0, m1)
        fx, fb = path_engine.endpoint_values(problem, max_memory=max_memory) if endpoints \
            else (None, None)
        sums, n, nodes, reg = integrate(fx, fb, m0, m1)
        part = sums * ((m1 - m0) / M) if size < M else sums
        total = part if total is None else total + part
        evaluations += n
        used = nodes if used is None or nodes is None else used + nodes
        regions = None if reg is None or regions is None else regions + [reg]
        fbs.append(fb)
        problem.baselines = None  # the group's references go before the next group's
        del sums, part, fb
    return (total, evaluations, used, None if regions is None else torch.cat(regions, 1), fx,
            torch.cat(fbs, 1) if endpoints else None)


def mean_gap(sums: torch.Tensor, fx: torch.Tensor | None,
             fb: torch.Tensor | None) -> torch.Tensor:
    """``gap [B] = sum(attr) - mean_m (f(x) - f(r_m))`` from the sums ``[B, D]`` and the
    endpoint outputs ``fx [B]``, ``fb [B, M]``; NaN without them."""
    if fx is None:
        return torch.full((sums.shape[0],), float("nan"), dtype=sums.dtype,
                          device=sums.device)
    return sums.detach().sum(1) - (fx - fb.mean(1))
