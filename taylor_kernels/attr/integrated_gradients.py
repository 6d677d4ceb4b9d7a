"""Integrated Gradients on the path engine, with fixed and adaptive quadrature.

``IG_i(x) = (x_i - b_i) int_0^1 d_i f(b + t (x - b)) dt``, averaged over the ``K`` baselines of
each input. The completeness gap ``sum_i IG_i - mean_k (f(x) - f(b_k))`` is reported per input.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from taylor_kernels import backends
from taylor_kernels.engine import chunking, memory, path_engine, quadrature
from taylor_kernels.engine.chunking import call_threads
from taylor_kernels.engine.derivative import flex_runs_eager_on_cpu
from taylor_kernels.engine.distributed import (first_collective_agreed, holds_partial_sums,
                                               is_root)
from taylor_kernels.engine.problem import PathProblem, make_problem
from taylor_kernels.progress import progress_bar
from taylor_kernels.user_warnings import warn
from taylor_kernels.engine.guards import public_call

DEFAULT_ADAPTIVE_TOL = 1e-4


@dataclass
class AttributionResult:
    """Attributions (a tensor, or a tuple for tuple inputs), the per-input completeness gap
    ``[B]`` and the number of model forward+backward evaluations (path points) spent."""

    attributions: torch.Tensor | tuple[torch.Tensor, ...]
    gap: torch.Tensor
    evaluations: int
    nodes_per_input: torch.Tensor | None = None
    regions: torch.Tensor | None = None  # rule="exact": regions crossed per path [B, K]


def _gap(problem: PathProblem, attr_flat: torch.Tensor, fx: torch.Tensor,
         fb: torch.Tensor) -> torch.Tensor:
    return attr_flat.sum(dim=1) - (fx - fb.mean(dim=1))


def _check_gap_tolerance(gap: torch.Tensor, delta: torch.Tensor, tol: float) -> torch.Tensor:
    """Per-input mask of ``|gap| <= tol * |f(x) - f(b)|`` (with a rounding floor)."""
    floor = torch.finfo(gap.dtype).eps * 16 * (1 + delta.abs())
    return gap.abs() <= torch.maximum(tol * delta.abs(), floor)


def _fixed_rule(problem, rule, steps, **engine_kw):
    alphas, weights = quadrature.nodes_and_weights(rule, steps)
    res = path_engine.integrate(problem, alphas, [weights], **engine_kw)
    return res.sums[0], res.evaluations, None


def _levels_agree(fine: torch.Tensor, coarse: torch.Tensor, tol: float) -> torch.Tensor:
    """Per input (``[n]``): every feature of two nested levels' attributions ``[n, D]`` within
    ``sqrt(tol)`` of the largest attribution (a rounding floor beside it). The gap alone
    passes errors that cancel in the sum: ``x0^3 - x1^3`` from 0 to (1, 1) stopped at one
    node with (0.75, -0.75) for (1, -1)."""
    scale = fine.abs().amax(dim=1)
    floor = torch.finfo(fine.dtype).eps * 16 * (1 + scale)
    return (fine - coarse).abs().amax(dim=1) <= torch.maximum(tol ** 0.5 * scale, floor)


def _converged(gap, delta, fine, coarse, tol: float, last: bool, labels) -> torch.Tensor:
    """Per input ``[n]``: the adaptive rule's stop, ``|gap| <= tol |delta|`` and (with the
    previous level's ``coarse [n, D]``; None at the first) ``fine [n, D]`` agreeing with it
    (:func:`_levels_agree`). At the ``last`` level, inputs whose gap met ``tol`` but whose
    features still disagree (errors that cancel in the sum: the gap warning cannot see them)
    are named by their ``labels [n]`` in a warning."""
    small_gap = _check_gap_tolerance(gap, delta, tol)
    met = small_gap & _levels_agree(fine, coarse, tol) if coarse is not None else \
        torch.zeros_like(small_gap)
    if last and bool((small_gap & ~met).any()):
        warn(f"adaptive rule: inputs {labels[small_gap & ~met].tolist()[:8]} meet the "
             f"completeness gap but their attributions still change by more than "
             f"sqrt(tol) = {tol ** 0.5:.1e} of the largest between 31 and 63 nodes "
             "(errors that cancel in the sum); use a fixed rule with more steps", RuntimeWarning)
    return met


def completed(problem: PathProblem, flat: torch.Tensor, rows=slice(None)) -> torch.Tensor:
    """The sums whose total is ``f(x) - f(b)``: ``flat [..., n, D]`` of inputs ``rows``, times
    ``x - b`` for a model whose sums lack that factor (``path_factor``: Captum's
    ``multiply_by_inputs=False``, whose exact rule fell back to this rule's refinement on a
    gap without the factor: all 63 nodes for every input, and a false warning)."""
    factor = getattr(problem.model, "path_factor", None)
    return flat if factor is None else flat * factor(problem)[rows].to(flat)


def _adaptive(problem: PathProblem, tol: float, fx, fb, only=None, progress: bool = False,
              **engine_kw):
    """Refine each input through nested Patterson levels until its gap is within ``tol`` and
    its attributions agree with the previous level's feature by feature
    (:func:`_levels_agree`; so at least the 3-node level) (only the inputs where the mask
    ``only [B]`` is true, when given; the others get zeros).

    Each input takes the first level that meets ``tol``. The first pass evaluates every level
    up to the one that the previous call on this model, shape and ``tol`` needed for all its
    inputs (kept beside the chunk choice), so a model that needs the fine levels runs them in
    one pass instead of one pass per level; the attributions are the same either way. Under a
    process group the first pass is level 0 on every rank, without the cache: it is per
    process, and a rank with another call history passed other nodes (every rank was then
    told the ranks' arguments differ). ``progress``: one bar over the whole call, its total
    growing by each pass's points, the finest level so far in its postfix."""
    nodes, level_weights = quadrature.patterson_levels()
    sizes = [int((w != 0).sum()) for w in level_weights]
    B, K, last = problem.B, problem.K, len(sizes) - 1
    delta = fx - fb.mean(dim=1)
    acc = [torch.zeros_like(problem.x, dtype=fx.dtype) for _ in sizes]
    done = torch.zeros(B, dtype=torch.bool, device=problem.x.device)
    if only is not None:
        done |= ~only.to(done.device)
    final = torch.zeros_like(acc[0])
    used = torch.zeros(B, dtype=torch.long)
    slot = None if engine_kw.get("process_group") is not None else \
        chunking.cache_slot(problem, problem.x, K, kind=f"adaptive{tol}")
    slot = {} if slot is None else slot
    evaluations, level, lo, cost, needed = 0, 0, 0, None, []
    with progress_bar(is_root(engine_kw.get("process_group")) and progress,
                      desc="adaptive IG path points", unit="pt") as bar:
        while not done.all():
            top = min(slot.get("level", 0), last) if lo == 0 else level  # this pass: level..top
            rows = (~done).nonzero().squeeze(1)
            bl = problem.baselines[rows] if problem.baselines.shape[0] > 1 else \
                problem.baselines
            bar.set_postfix_str(f"level {top}/{last}, nodes={sizes[top]}", refresh=False)
            res = path_engine.integrate(problem, nodes[lo:sizes[top]],
                                        [w[lo:sizes[top]] for w in level_weights[level:]],
                                        x=(problem.attached_x() if engine_kw.get("create_graph")
                                           else problem.x)[rows],
                                        baselines=bl, rows=rows, point_cost=cost, bar=bar,
                                        held=sum(a.nbytes for a in acc) + final.nbytes,
                                        **engine_kw)
            cost = res.point_cost  # later levels chunk from it without probing again
            evaluations += res.evaluations
            for j, part in enumerate(res.sums):
                acc[level + j][rows] += part
            for lev in range(level, top + 1):
                rows = (~done).nonzero().squeeze(1)
                gap = completed(problem, acc[lev][rows], rows).sum(dim=1) - delta[rows]
                met = _converged(gap, delta[rows], acc[lev][rows],
                                 acc[lev - 1][rows] if lev > 0 else None, tol, lev == last,
                                 rows)
                ok = rows[met | (lev == last)]
                final[ok], done[ok] = acc[lev][ok], True
                used[ok.cpu()] = sizes[lev] * K
                needed += [lev] * len(ok)
            level, lo = top + 1, sizes[top]
    if needed:
        slot["level"] = min(needed)
    return final, evaluations, used


@public_call
@first_collective_agreed
@flex_runs_eager_on_cpu  # (no backward through it on the CPU)
@call_threads()  # fewer threads while the machine is oversubscribed (engine/chunking.py)
def integrated_gradients(model, inputs, baselines=None, target=None, *, steps: int = 50,
                         rule: str = "gausslegendre", tol: float | None = None,
                         additional_forward_args=None, max_memory=None, backend: str | None = None,
                         progress: bool = False, chunk_size: int | None = None,
                         create_graph: bool = False, distributed=False,
                         reduce_to="all", max_regions: int | None = None,
                         gap: bool = True) -> AttributionResult:
    """Integrated Gradients ``IG_i = (x_i - b_i) int_0^1 d_i f(b + t (x - b)) dt``.

    Args:
        model: callable ``model(*inputs, *additional_forward_args) -> [B, ...]``.
        inputs: tensor ``[B, ...]`` or tuple of such tensors (tuple in, tuple out).
        baselines: None (zeros), a number, a tensor shaped like one input ``[...]``, like the
            batch ``[B|1, ...]``, or ``[B|1, K, ...]`` for ``K`` baselines per input (averaged);
            a tuple of these for tuple inputs.
        target: output index per input: int, tuple, tensor ``[B]`` or list; None for scalar
            outputs.
        steps, rule: quadrature (``riemann_left|right|middle|trapezoid``, ``gausslegendre``
            as in Captum; ``trapezoid``; ``adaptive`` refines nested Patterson rules of 1, 3, 7,
            15, 31, 63 nodes per input until ``|gap| <= tol * |f(x) - f(b)|`` and the last two
            levels agree feature by feature (to ``sqrt(tol)`` of the largest), ``tol``
            default 1e-4; ``steps`` is then unused; ``exact`` sums the linear regions of a
            piecewise-linear model exactly, :mod:`taylor_kernels.attr.exact_ig`, falling back
            to ``adaptive`` with a warning for other models or paths crossing more than
            ``max_regions`` regions, default 10000).
        max_memory: bytes or e.g. ``"1GB"``, a hard limit for the path's chunks (default: a
            fraction of the free memory, RAM or device, with chunk sizes chosen by timing:
            :mod:`~taylor_kernels.engine.chunking`); ``chunk_size`` fixes points per chunk.
        backend: force a kernel backend for this call; progress: tqdm bar over path points;
        create_graph: keep the graph so attributions can be differentiated (training).
        distributed: ``True`` (default process group) or a ``ProcessGroup``: shard the path
            points over its ranks (:mod:`taylor_kernels.engine.distributed`; every rank passes
            the same arguments); ``reduce_to="all"`` gives every rank the result, ``0`` only
            rank 0 (the others get their own shard's partial sums, a NaN ``gap`` and no
            warning about it); ``progress`` draws a bar on the group's rank 0 only. Inside
            :func:`~taylor_kernels.allow_row_coupling` each rank's shard is its own batch
            (a ``RuntimeWarning`` says so).
        gap: False skips the forward of the inputs and baselines that the completeness gap
            needs (``gap`` is then NaN), as Captum's IG without ``return_convergence_delta``;
            the adaptive and exact rules, and a ``tol``, need it and run it anyway.
    Returns:
        :class:`AttributionResult` with ``attributions`` (shaped like ``inputs``), ``gap [B]``,
        ``evaluations`` and, for ``adaptive`` and ``exact``, ``nodes_per_input [B]``; for
        ``exact`` also ``regions [B, K]`` (linear regions crossed per path, -1: fell back).
    """
    check_rule_args(rule, tol, max_regions)
    if create_graph and not torch.is_grad_enabled():
        raise ValueError("create_graph=True inside torch.no_grad(): no graph can be kept; "
                         "call it with grad enabled")
    with backends.selected(backend):  # the backend is checked before any forward
        problem = make_problem(model, inputs, baselines, target, additional_forward_args,
                               defer_row_check=True)  # its first batch checks
        # a chunk_size below the batch: the inputs' and the baselines' forwards apart, as
        # Captum's delta runs them (a forward may accept only its own batch size)
        chunk = memory.check_chunk_size(chunk_size)
        fx = fb = None
        if gap or rule in ("adaptive", "exact") or tol is not None:
            fx, fb = path_engine.endpoint_values(
                problem, chunk=max(chunk, min(problem.B, 256)) if chunk else 256,
                max_memory=max_memory)
        return integrate_problem(problem, fx, fb, steps=steps, rule=rule, tol=tol,
                                 max_memory=max_memory, progress=progress,
                                 chunk_size=chunk_size, create_graph=create_graph,
                                 distributed=distributed, reduce_to=reduce_to,
                                 max_regions=max_regions)


def check_rule_args(rule: str, tol: float | None, max_regions=None) -> None:
    """Refuse an unknown ``rule``, a ``tol`` that is not a positive number, or a
    ``max_regions`` that is not a positive integer or comes without ``rule="exact"`` (it was
    ignored), before any forward."""
    quadrature.check_rule(rule)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real)):
        raise TypeError(f"tol must be a number, got {type(tol).__name__} {tol!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    check_max_regions(max_regions, rule)


def check_max_regions(max_regions, rule) -> None:
    """``ValueError`` unless ``max_regions`` is None, or a positive integer with
    ``rule="exact"`` (a NaN, a string or True got unclear errors or passed, and another rule
    ignored it)."""
    if max_regions is None:
        return
    if isinstance(max_regions, bool) or not isinstance(max_regions, numbers.Integral) \
            or max_regions < 1:
        raise ValueError(f"max_regions must be a positive integer, got "
                         f"{type(max_regions).__name__} {max_regions!r}")
    if rule != "exact":
        raise ValueError(f"max_regions caps rule='exact'; it has no effect on rule={rule!r}")


def integrate_problem(problem: PathProblem, fx: torch.Tensor | None,
                      fb: torch.Tensor | None, *,
                      steps: int = 50, rule: str = "gausslegendre", tol: float | None = None,
                      max_memory=None, backend: str | None = None, progress: bool = False,
                      chunk_size: int | None = None, create_graph: bool = False,
                      distributed=False, reduce_to="all",
                      max_regions: int | None = None) -> AttributionResult:
    """The path integral of :func:`integrated_gradients` for a prepared problem whose
    endpoint outputs ``fx [B]`` and ``fb [B, K]`` are known (in the accumulation dtype, as
    :func:`~taylor_kernels.engine.path_engine.endpoint_values` gives them; None for a fixed
    rule without a gap, which is then NaN); arguments as there, ``rule`` and ``tol``
    already checked by :func:`check_rule_args` (before any forward)."""
    with backends.selected(backend):
        kw = dict(max_memory=max_memory, chunk_size=chunk_size, progress=progress,
                  create_graph=create_graph, **_distributed_kw(distributed, reduce_to, rule,
                                                               create_graph))
        regions = None
        if rule == "adaptive":
            flat, evaluations, used = _adaptive(problem, tol or DEFAULT_ADAPTIVE_TOL, fx, fb, **kw)
        elif rule == "exact":
            from taylor_kernels.attr.exact_ig import exact_integral
            flat, evaluations, used, regions = exact_integral(problem, fx, fb, tol=tol,
                                                              max_regions=max_regions, **kw)
        else:
            flat, evaluations, used = _fixed_rule(problem, rule, steps, **kw)
        # (reduce_to=0: the other ranks' partial sums have no completeness gap)
        partial = holds_partial_sums(kw.get("process_group"), kw.get("reduce_to"))
        if fx is None or partial:
            gap = torch.full((problem.B,), float("nan"), dtype=flat.dtype, device=flat.device)
        else:
            gap = _gap(problem, flat.detach(), fx, fb)
    if fx is not None and not partial:
        _warn_if_gap_large(gap, fx - fb.mean(dim=1), tol or DEFAULT_ADAPTIVE_TOL, rule, tol,
                           problem.x.dtype)
    attrs = problem.split(flat)  # float32 for float32/bf16/fp16 inputs, float64 for float64
    return AttributionResult(attrs if problem.was_tuple else attrs[0], gap, evaluations, used,
                             regions)


def _distributed_kw(distributed, reduce_to, rule: str, create_graph: bool) -> dict:
    """Engine arguments for the ``distributed`` option (empty for one process)."""
    from taylor_kernels.engine.distributed import (check_reduce_to, resolve_group,
                                                   warn_if_rows_couple)
    check_reduce_to(reduce_to)
    group = resolve_group(distributed)
    if group is None:
        return {}
    if create_graph:
        raise ValueError("create_graph=True is not supported with distributed=...: the "
                         "all-reduce of partial sums is not differentiable; shard the batch "
                         "across ranks with DistributedDataParallel instead")
    warn_if_rows_couple(group)
    # the adaptive rule decides refinement from the sums: every rank needs them
    return {"process_group": group,
            "reduce_to": "all" if rule in ("adaptive", "exact") else reduce_to}


def low_precision_note(dtype: torch.dtype) -> str:
    """For a gap warning of a model computing in ``dtype``: in bfloat16 / float16 its own
    rounding, not the rule, can hold the gap (more nodes did not move it), which the
    warnings' advice did not say."""
    if dtype not in (torch.bfloat16, torch.float16):
        return ""
    return (f" (the model computes in {str(dtype).removeprefix('torch.')}: its rounding can "
            "hold such a gap whatever the rule; compare with a float32 copy of the model)")


def _warn_if_gap_large(gap, delta, tol, rule, user_tol, dtype: torch.dtype | None = None
                       ) -> None:
    """Say so when the adaptive rule ran out of levels, or a fixed rule missed a given tol
    (``rule="exact"``: its fallback rows warn in :func:`exact_ig.exact_integral`); ``dtype``
    the model's inputs' (:func:`low_precision_note`)."""
    if rule == "exact" or rule != "adaptive" and user_tol is None:
        return
    bad = ~_check_gap_tolerance(gap, delta, tol)
    if bad.any():
        worst = (gap.abs() / delta.abs().clamp_min(1e-30))[bad].max().item()
        hint = ("after the finest level (63 nodes)" if rule == "adaptive"
                else f"with rule {rule!r}; use more steps or rule='adaptive'")
        warn(f"{int(bad.sum())} input(s) miss the completeness tolerance {tol:g} "
             f"{hint}: worst relative gap {worst:.3g}"
             + low_precision_note(dtype or gap.dtype), RuntimeWarning)
