"""The ``exact`` rule: path integrals of piecewise-linear networks as finite sums over regions.

``int_0^1 grad f(b + t (x - b)) dt = sum_r (t_{r+1} - t_r) grad f(midpoint_r)`` when ``f`` is
piecewise-linear (:mod:`taylor_kernels.engine.exact_path` finds the ``t_r``). The midpoints of
all paths go through the path engine as per-path nodes with region-length weights (inputs
grouped by region count so that zero-weight padding stays small), so the memory budget,
chunking, progress bar and distribution apply. A model the exact engine cannot handle, and
inputs whose paths cross more than ``max_regions`` regions, fall back to the adaptive rule
with a ``RuntimeWarning``. Used by IG, expected gradients and Shapley IG (straight paths all).
"""
from __future__ import annotations

import torch

from taylor_kernels.attr.integrated_gradients import (DEFAULT_ADAPTIVE_TOL, _adaptive,
                                                      _warn_if_gap_large, completed)
from taylor_kernels.engine import exact_path, path_engine
from taylor_kernels.engine.exact_rules import NotPiecewiseLinear
from taylor_kernels.engine.problem import PathProblem
from taylor_kernels.user_warnings import warn

PADDING_RATIO = 1.25  # inputs integrated together need at most this many times the fewest nodes
PADDING_SLACK = 16    # ... or at most this many more (small plans: fewer engine calls)


def groups_by_size(sizes: torch.Tensor, ratio: float = PADDING_RATIO,
                   slack: int = PADDING_SLACK) -> list[torch.Tensor]:
    """Indices of ``sizes [B]`` in groups whose largest size is at most
    ``max(ratio * smallest, smallest + slack)`` (sorted ascending; each group pads to its
    largest)."""
    order = torch.argsort(sizes.cpu(), stable=True)
    ordered = sizes.cpu()[order].tolist()
    groups, start = [], 0
    for i in range(1, len(ordered) + 1):
        low = ordered[start]
        if i == len(ordered) or ordered[i] > max(ratio * low, low + slack):
            groups.append(order[start:i])
            start = i
    return groups


def _warn(message: str) -> None:
    warn(f"rule='exact': {message}", RuntimeWarning)


def _fallback(problem: PathProblem, tol: float, fx, fb, only, engine_kw: dict):
    """The adaptive rule on rows ``only`` (None: all), warning for those of them that miss
    ``tol`` after its finest level, as ``rule='adaptive'`` itself warns."""
    flat, evaluations, used = _adaptive(problem, tol, fx, fb, only=only, **engine_kw)
    rows = slice(None) if only is None else only.to(flat.device)
    delta = (fx - fb.mean(dim=1))[rows]
    _warn_if_gap_large(completed(problem, flat.detach()[rows], rows).sum(dim=1) - delta,
                       delta, tol, "adaptive", tol, problem.x.dtype)
    return flat, evaluations, used


def check_no_graph(create_graph: bool) -> None:
    """``ValueError`` for ``create_graph=True``: the exact rule's breakpoints move with the
    weights, so there is no graph to train through."""
    if create_graph:
        raise ValueError("rule='exact' does not support create_graph=True: its breakpoints "
                         "move with the weights; use a fixed rule to train through attributions")


def exact_integral(problem: PathProblem, fx: torch.Tensor, fb: torch.Tensor, *,
                   max_regions: int | None = None, tol: float | None = None, **engine_kw):
    """Exact ``sum_k (x - b_k) / K * int grad f`` per input, with the adaptive fallback.

    Args: ``problem``; ``fx [B]``, ``fb [B, K]`` endpoint outputs; ``max_regions`` cap per path
    (default :data:`~taylor_kernels.engine.exact_path.DEFAULT_MAX_REGIONS`); ``tol`` the
    fallback's tolerance; ``engine_kw`` for :func:`path_engine.integrate`.
    Returns: ``(sums [B, D], evaluations, nodes_per_input [B], regions [B, K])``;
    ``regions`` is ``-1`` for every path of an input with a path over the cap or whose
    exact sums missed completeness beyond rounding, and for every path when the whole call
    fell back (all then take the adaptive rule, with a warning).
    """
    check_no_graph(engine_kw.get("create_graph"))
    cap = exact_path.DEFAULT_MAX_REGIONS if max_regions is None else max_regions
    tol = tol or DEFAULT_ADAPTIVE_TOL
    try:
        with torch.no_grad():
            plan = exact_path.plan(problem, fx, fb, max_regions=cap,
                                   max_memory=engine_kw.get("max_memory"))
    except NotPiecewiseLinear as exc:
        _warn(f"{exc.reason}; falling back to rule='adaptive' (tol={tol:g})")
        flat, evaluations, used = _fallback(problem, tol, fx, fb, None, engine_kw)
        return flat, evaluations, used, torch.full((problem.B, problem.K), -1, dtype=torch.long)
    ok = (plan.regions >= 0).all(dim=1)
    flat, evaluations, cost = None, 0, None
    used = torch.zeros(problem.B, dtype=torch.long)
    sizes = plan.regions.clamp_min(1).max(dim=1).values
    bl = problem.baselines
    for rows in groups_by_size(sizes[ok]):
        rows = ok.nonzero().squeeze(1)[rows.to(ok.device)]
        S = int(sizes[rows].max())
        res = path_engine.integrate(problem, plan.alphas[rows, :, :S],
                                    [plan.weights[rows, :, :S]], x=problem.x[rows],
                                    baselines=bl[rows] if bl.shape[0] > 1 else bl, rows=rows,
                                    point_cost=cost, **engine_kw)
        cost = res.point_cost
        if flat is None:
            flat = res.sums[0].new_zeros(res.sums[0].shape[:-2] + problem.x.shape)
        flat[..., rows, :] = res.sums[0]
        evaluations += res.evaluations
        used[rows.cpu()] = S * problem.K
    regions = plan.regions
    over = ~ok
    if flat is not None:  # an exact sum is complete to rounding, or the trace did not follow
        missed = ok & ~_complete(completed(problem, flat), problem.x.dtype, fx, fb)  # the model
        # along the path (sums without the x - b factor: times it)
        if missed.any():  # (a broadcast, a hook, an in-place op: wrong numbers, silently)
            _warn(f"{int(missed.sum())} input(s)' exact sums miss completeness beyond rounding "
                  "(the traced graph does not follow the model along the path); using "
                  f"rule='adaptive' (tol={tol:g}) for them")
            flat[..., missed.to(flat.device), :] = 0
            ok, regions = ok & ~missed, regions.clone()
            regions[missed.to(regions.device)] = -1
    if not ok.all():
        if over.any():
            _warn(f"{int(over.sum())} input(s) cross more than max_regions={cap} linear "
                  f"regions; using rule='adaptive' (tol={tol:g}) for them")
        regions = regions.clone()  # every path of an input that falls back reads -1 (its
        regions[~ok.to(regions.device)] = -1  # paths within the cap read their count)
        part, n, nodes = _fallback(problem, tol, fx, fb, ~ok, engine_kw)
        flat = part if flat is None else flat + part
        evaluations += n
        used[~ok.cpu()] = nodes[~ok.cpu()]
    return flat, evaluations, used, regions


def _complete(flat: torch.Tensor, dtype: torch.dtype, fx: torch.Tensor,
              fb: torch.Tensor) -> torch.Tensor:
    """``[B]``: the attributions sum to ``f(x) - mean_k f(b_k)`` within ``sqrt(eps)`` of the
    inputs' dtype times the terms' size, the outputs' own included (exact sums miss by
    rounding alone: 1e-15 relative in float64, 1e-7 in float32, and f(x), f(b) round at their
    own size: a logit of 10 with f(x) - f(b) of 1e-4 flagged correct sums; the traces that did
    not follow a model missed by 5-30%)."""
    total = flat.detach().sum(dim=-1)
    delta = fx - fb.mean(dim=1)
    ends = fx.abs() + fb.abs().mean(dim=1)
    if total.dim() > delta.dim():  # [T, B] sums for T outputs per point
        delta, ends = delta.movedim(-1, 0), ends.movedim(-1, 0)
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps
    size = flat.detach().abs().sum(dim=-1) + ends
    ok = (total - delta).abs() <= eps ** 0.5 * size.clamp_min(torch.finfo(torch.float64).tiny)
    return ok if ok.dim() == 1 else ok.all(dim=0)
