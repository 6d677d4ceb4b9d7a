"""The path engine: streams ``inputs x baselines x nodes`` through the model in chunks.

For a chunk ``[start, start+count)`` of flattened path points ``n = (b*K + k)*S + s`` it builds
the points with ``ops.path_points``, runs forward and backward once, checks the gradients, and
reduces them with ``ops.path_accumulate`` into one ``[B, D]`` sum per weight vector (several
weight vectors share one set of gradients: nested rules, or the ``(1 - t)`` / ``-t ln t``
integrals). Chunks are sized to a memory budget from a measured per-point cost and halved on
out-of-memory. The engine never knows which attribution method is running.

Multi-target contract: ``problem.forward(points [N, D], rows [N])`` returns either ``[N]`` (one
scalar output per point) or ``[N, T]`` (``T`` scalar outputs per point, e.g. the log-probs of
``T`` target tokens of a causal LM). For ``[N, T]``, one forward per chunk serves all ``T``
outputs: one batched backward (``torch.autograd.grad(..., is_grads_batched=True)`` with one-hot
``grad_outputs [T, N, T]``) gives gradients ``[T, N, D]``; if vmap cannot run the model's
backward, the engine says so once (``RuntimeWarning``), remembers it on the problem
(``problem.serial_backward = True``) and runs ``T`` backward passes over the retained graph.
:func:`integrate` then returns ``Integral.sums[i]`` of shape ``[T, B', D]`` (one IG sum per
output) and :func:`endpoint_values` ``f(x) [B, T]``, ``f(b) [B, K, T]``. The memory probes
count ``T`` gradients flowing through the graph for the batched backward, one for serial
passes (see :func:`memory.cpu_point_cost`).
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable
from dataclasses import dataclass

import torch

from taylor_kernels import ops
from taylor_kernels.engine import chunking, cuda_graphs, derivative, distributed, guards, memory
from taylor_kernels.engine.problem import PathProblem
from taylor_kernels.numerics import accumulation_dtype, finite_rows
from taylor_kernels.progress import extend, progress_bar
from taylor_kernels.user_warnings import warn

@dataclass
class Integral:
    """Result of :func:`integrate`: one ``[B', D]`` sum per weight vector (``[T, B', D]`` for a
    problem with ``T`` outputs per point), and the cost
    (``point_cost``: measured bytes per path point, reusable by a later call on the model)."""

    sums: list[torch.Tensor]
    evaluations: int
    chunk_size: int
    point_cost: float | None = None


def _measure(run, device: torch.device, batched: bool = True,
             budget: int | None = None) -> tuple[torch.Tensor, float]:
    """Run ``run()`` (path gradients ``[count, D]`` or ``[T, count, D]``) and return its result
    with the bytes it needed beyond what was live (``batched``: the ``T`` gradients flowed
    through the graph together, not in ``T`` serial passes). ``budget``: an explicit limit for
    this one-point probe on the CPU, whose forward stops with ``MemoryError`` once it saved
    more than a point within it could (:func:`memory.saved_limit`)."""
    if device.type == "cuda":  # the caller's peak statistic is kept
        return guards.cuda_peak_bytes(run, device)
    limit = None if budget is None else memory.saved_limit(budget)
    try:
        with memory.SavedBytes(limit) as saved:
            out = run()
    except memory.SavedPastLimit as past:
        raise MemoryError(f"memory budget of {budget} bytes is too small for one path point "
                          f"(its forward saved {past.saved} bytes before it was stopped); "
                          "raise max_memory") from None
    outputs = out.shape[0] if out.dim() == 3 else 1
    point_bytes = out.shape[-2] * out.shape[-1] * out.element_size()
    return out, memory.cpu_point_cost(saved.total, point_bytes, outputs, batched)


def _backward(problem, out: torch.Tensor, pts: torch.Tensor, create_graph: bool):
    """Gradient of ``out [N]`` (summed) or of each column of ``out [N, T]`` w.r.t. ``pts``:
    ``[N, D]`` or ``[T, N, D]`` (``None`` when ``out`` does not reach ``pts``). Batched over
    ``T`` by vmap unless that failed before on this problem."""
    if out.dim() == 1:
        return torch.autograd.grad(out.sum(), pts, create_graph=create_graph,
                                   allow_unused=True)[0]
    T = out.shape[1]
    if T > 1 and not getattr(problem, "serial_backward", False):
        onehot = torch.eye(T, dtype=out.dtype, device=out.device).unsqueeze(1)
        try:
            return torch.autograd.grad(out, pts, onehot.expand(T, *out.shape),
                                       retain_graph=True, create_graph=create_graph,
                                       allow_unused=True, is_grads_batched=True)[0]
        except (RuntimeError, NotImplementedError) as exc:
            if memory.is_oom(exc) or (out.is_cuda and cuda_graphs.capturing()):
                raise  # (a failed CUDA graph capture is not vmap's failure)
            problem.serial_backward = True
            warn(f"the model's backward cannot run under vmap ({str(exc)[:120]}); "
                 f"computing its {T} output gradients with {T} backward passes", RuntimeWarning)
    grads = [torch.autograd.grad(out[:, t].sum(), pts, retain_graph=t < T - 1,
                                 create_graph=create_graph, allow_unused=True)[0]
             for t in range(T)]
    return None if grads[0] is None else torch.stack(grads)


def point_gradients(problem: PathProblem, pts: torch.Tensor, point_rows: torch.Tensor,
                    create_graph: bool = False) -> torch.Tensor:
    """Gradients ``[N, D]`` (``[T, N, D]``) of the selected output at points ``pts [N, D]``
    (requiring grad) of inputs ``point_rows [N]``: one forward, one (batched) backward.
    Raises when the output does not reach the points."""
    count = pts.shape[0]
    with torch.enable_grad():
        out = problem.forward(pts, point_rows)
        if not out.requires_grad:
            raise ValueError(guards.NO_GRADIENT_PATH)
        if out.dim() not in (1, 2) or out.shape[0] != count:
            raise ValueError(f"problem.forward returned shape {tuple(out.shape)} for {count} "
                             f"points; expected [{count}] or [{count}, T]")
        grad = _backward(problem, out, pts, create_graph)
    if grad is None:
        raise ValueError(guards.NO_GRADIENT_PATH)
    return grad


def path_gradients(problem: PathProblem, x: torch.Tensor, bl: torch.Tensor, rows: torch.Tensor,
                   alphas: torch.Tensor, start: int, count: int,
                   create_graph: bool = False, check: bool = True,
                   graph: cuda_graphs.ChunkGraph | None = None) -> torch.Tensor:
    """Gradients ``[count, D]`` of the selected output at path points ``[start, start+count)``
    (``[T, count, D]`` when ``problem.forward`` returns ``T`` outputs per point).

    ``rows`` ``[B']`` maps the local inputs of ``x [B', D]`` to the problem's inputs (target
    and additional forward args). Raises on a missing gradient path, and on non-finite
    gradients when ``check`` (a host sync; see :func:`_defer_checks`). ``graph``: run the
    forward and backward by this :class:`~.cuda_graphs.ChunkGraph` (its static output is
    returned unchecked; the engine's deferred check reads it) unless it cannot capture them.
    """
    K, S = bl.shape[1], alphas.shape[-1]
    pts = ops.path_points(x, bl, alphas, start, count)
    point_rows = rows[torch.arange(start, start + count, device=x.device) // (K * S)]
    if graph is not None:
        grad = graph(pts, point_rows)
        if grad is not None:
            return grad
    steps_first = guards.row_coupling_allowed() and start == 0 and \
        count == x.shape[0] * K * S and alphas.dim() == 1 and S > 1
    if steps_first:  # (rows that couple, the whole path in one batch: in Captum's order)
        pts, point_rows = _steps_first(pts, x.shape[0] * K, S), \
            _steps_first(point_rows, x.shape[0] * K, S)
    grad = point_gradients(problem, pts.requires_grad_(True), point_rows, create_graph)
    if steps_first:
        grad = _steps_first(grad, S, x.shape[0] * K)
    if check:
        bad = _non_finite_points(grad)
        if bad.any():
            n = start + int(bad.nonzero()[0])
            b, k, s = n // (K * S), (n // S) % K, n % S
            alpha = alphas[s] if alphas.dim() == 1 else alphas[b, k, s]
            raise FloatingPointError(
                f"non-finite gradient at path node: input {int(rows[b])}, baseline {k}, "
                f"alpha={float(alpha):.6g} (flattened point {n})"
                + _non_finite_output_note(problem, pts, point_rows, n - start))
    return grad


@torch.no_grad()
def _non_finite_output_note(problem, pts: torch.Tensor, point_rows: torch.Tensor,
                            i: int) -> str:
    """For the non-finite gradient error at point ``i`` of ``pts [N, D]``: whether the
    model's output is already non-finite there (then the forward, not the attribution, is at
    fault: a fully masked row under eager attention gives NaN), from one more forward."""
    out = problem.forward(pts[i:i + 1].detach(), point_rows[i:i + 1])
    if bool(torch.isfinite(out).all()):
        return ""
    return ("; the model's output itself is non-finite at that point (the forward gives "
            f"{out.flatten()[~torch.isfinite(out.flatten())][0].item()} with no attribution "
            "involved: check the model on this input, its masks and dtype)")


def _call_of(problem) -> list:
    """The target and forward args of ``problem`` (what else a rank's call may differ in)."""
    target = getattr(problem, "target", None)
    return [target if isinstance(target, torch.Tensor) else repr(target),
            *getattr(problem, "forward_args", ())]


def _steps_first(t: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """Rows ``[outer * inner, ...]`` (along the last dimension but one for ``[T, N, D]``
    gradients, else the first) reordered from ``outer``-major to ``inner``-major: a whole
    path's points from the engine's order (input, baseline, step) to Captum's (step, then
    input), and back with the two swapped. Dropout in train mode (attributed as Captum does)
    then masks the same (input, step) pairs as Captum's call under the same seed."""
    dim = t.dim() - 2 if t.dim() == 3 else 0
    shape = t.shape[:dim] + (outer, inner) + t.shape[dim + 1:]
    return t.reshape(shape).transpose(dim, dim + 1).reshape(t.shape)


def _non_finite_points(grad: torch.Tensor) -> torch.Tensor:
    """``[count]`` bool: points whose gradient (any of ``T`` outputs) has a NaN or Inf."""
    bad = ~finite_rows(grad)
    return bad.any(dim=0) if grad.dim() == 3 else bad


def _defer_checks(device: torch.device) -> bool:
    """On CUDA the non-finite check of each chunk would sync the host: it becomes a device
    flag per chunk, read once after the loop (the first bad chunk is then recomputed to name
    its node)."""
    return device.type == "cuda"


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; host tensors go to CUDA through pinned memory, without blocking."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _accumulate(sums: list[torch.Tensor], grads: torch.Tensor, x: torch.Tensor, bl: torch.Tensor,
                weight_sets: list[torch.Tensor], S: int, start: int, create_graph: bool) -> None:
    """Add one chunk into ``sums``, passing ``path_accumulate`` only the rows the chunk touches
    (a chunk spans few inputs; the op's ``[B, D]`` output would otherwise make every chunk cost
    ``O(B D)`` and the whole call ``O(B^2)``)."""
    per_input = bl.shape[1] * S
    r0, r1 = start // per_input, (start + grads.shape[-2] - 1) // per_input + 1
    xs = x[r0:r1]
    bs = bl[r0:r1] if bl.shape[0] > 1 else bl
    local = start - r0 * per_input
    rows = torch.arange(r0, r1, device=x.device)
    per_output = grads if grads.dim() == 3 else grads.unsqueeze(0)
    for i, w in enumerate(weight_sets):
        ws = w[r0:r1] if w.dim() == 3 else w
        part = torch.stack([ops.path_accumulate(g, xs, bs, ws, local) for g in per_output])
        if grads.dim() == 2:
            part = part[0]
        if create_graph:
            sums[i] = sums[i].index_add(-2, rows, part)
        else:
            sums[i][..., r0:r1, :].add_(part)


def run_chunks(plan: chunking.ChunkPlan, start: int, stop: int,
               compute: Callable[[int, int, bool], tuple[object, float | None]],
               consume: Callable[[int, object], None], *, align=None, progress: bool = False,
               desc: str = "path points", unit: str = "pt", bar=None) -> None:
    """The engine's one chunk loop over work items ``[start, stop)`` (path points, or
    (point, direction) pairs of an HVP method).

    ``plan`` sizes each chunk (probes, timed candidates, thread count; see
    :mod:`taylor_kernels.engine.chunking`); ``align(start, count)`` may shorten a chunk (e.g.
    to whole points); ``compute(start, count, measure)`` returns the chunk's result and, when
    ``measure``, its measured bytes; ``consume(start, result)`` folds the result into the
    caller's sums (outside the retry, so a chunk is added once). An out-of-memory error halves
    the chunk and retries the same items, down to one item; a tqdm bar counts the items:
    a new one (``progress``), or the caller's open ``bar``, which they join (its total grows
    by them; it stays open).
    """
    with _items_bar(bar, progress, stop - start, desc, unit) as bar:
        while start < stop:
            count = plan.next_count(stop - start)
            count = align(start, count) if align else count
            measure, timing = plan.measuring, bool(plan.trials)
            try:
                with plan.running():
                    began = time.perf_counter()
                    result, used = compute(start, count, measure)
                    if timing and plan.device.type == "cuda":
                        torch.cuda.synchronize(plan.device)
                    seconds = time.perf_counter() - began
            except Exception as exc:  # halve on OOM, re-raise anything else
                if not memory.is_oom(exc) or count == 1:
                    raise
                plan.halve(count)
                continue
            plan.record(count, seconds, used if measure else None)
            consume(start, result)
            start += count
            bar.update(count)


def _items_bar(bar, progress: bool, count: int, desc: str, unit: str):
    """A new bar over ``count`` items, or the caller's open ``bar`` with them added to its
    total (left open: the caller closes it)."""
    if bar is None:
        return progress_bar(progress, total=count, desc=desc, unit=unit)
    extend(bar, count)
    return contextlib.nullcontext(bar)


def _sum_bytes(problem: PathProblem, x: torch.Tensor) -> int:
    """Bytes of one weight vector's sums: ``[T, B', D]`` in the accumulation dtype (``T``
    outputs per point, 1 unless ``problem.forward`` returns ``[N, T]``)."""
    return getattr(problem, "T", 1) * x.numel() * accumulation_dtype(x.dtype).itemsize


def integrate(problem: PathProblem, alphas: torch.Tensor, weight_sets: list[torch.Tensor], *,
              x: torch.Tensor | None = None, baselines: torch.Tensor | None = None,
              rows: torch.Tensor | None = None, max_memory=None, chunk_size: int | None = None,
              progress: bool = False, bar=None, create_graph: bool = False,
              process_group=None, reduce_to="all", point_cost: float | None = None,
              max_share: float | None = chunking.MAX_SHARE, held: int = 0,
              same_call: tuple = ()) -> Integral:
    """Sum ``w_s * grad f(p) * (x - b_k) / K`` over all path points, for each weight vector.

    Args: ``alphas [S]`` or ``[B', K, S]`` nodes; ``weight_sets`` list of ``[S]`` or
    ``[B', K, S]`` weights; optional subset
    ``x [B', D]``, ``baselines [Bb', K, D]`` with ``rows [B']`` (defaults: the whole problem);
    ``max_memory`` bytes or ``"512MB"``; ``chunk_size`` fixes the points per chunk;
    ``point_cost`` (bytes per point, from an earlier :class:`Integral`) skips the probes.
    ``progress``: a bar over the points; ``bar``: the caller's open bar to count them on
    instead (one bar over several calls: the adaptive rule's levels).
    ``max_share``: without ``max_memory``, no chunk holds more than this share of the points
    (None: no cap; :class:`chunking.ChunkPlan`). ``process_group``: shard the points over its
    ranks and sum there (``reduce_to`` ``"all"`` or ``0``; see
    :mod:`taylor_kernels.engine.distributed`). ``held``: bytes the caller keeps beside the
    call (the adaptive rule's per-level sums), counted against ``max_memory``.
    ``same_call``: the caller's other arguments that shape the result (checked, with the
    points and weights, to be the same on every rank of ``process_group``).
    Returns: :class:`Integral` with one ``[B', D]`` sum per weight vector (``[T, B', D]`` when
    ``problem.forward`` returns ``[N, T]``; see the module docstring).
    """
    if x is None:
        x = problem.attached_x() if create_graph else problem.x
    if getattr(problem, "row_check_pending", False) and cuda_graphs.requested(x.device,
                                                                              create_graph):
        problem.finish_row_check_now()  # (a chunk's check inside a capture would sync)
    bl = problem.baselines if baselines is None else baselines
    if not create_graph:  # (x is detached too: no partial graph through the x - b factor)
        bl = bl.detach()
    rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
    alphas = _to_device(alphas, x.device)
    weight_sets = [_to_device(w, x.device) for w in weight_sets]
    total = x.shape[0] * bl.shape[1] * alphas.shape[-1]
    if process_group is not None:
        distributed.check_same_call(process_group, x, bl, rows, alphas, weight_sets,
                                    _call_of(problem), reduce_to, same_call)
    # (the ranks agree on a failure in their shards, from here, before the sums' collective)
    with distributed.agreed_outcome(process_group, x.device):
        start, stop = (0, total) if process_group is None else \
            distributed.shard(total, process_group)
        held += x.nbytes + bl.nbytes + len(weight_sets) * _sum_bytes(problem, x)  # inputs, sums
        plan = chunking.ChunkPlan(stop - start, x.device, chunk_size=chunk_size,
                                  max_memory=max_memory, cost=point_cost,
                                  # a choice made under another share cap is not this call's
                                  slot=chunking.cache_slot(problem, x, bl.shape[1],
                                                           kind=f"grad-share{max_share}"),
                                  reserved=held,
                                  multi_output=getattr(problem, "T", 1) > 1,
                                  max_share=max_share)
        sums: list[torch.Tensor] = []  # allocated once the first chunk shows T
        defer = _defer_checks(x.device)
        # deferred: (start, count, any non-finite)
        flags: list[tuple[int, int, torch.Tensor]] = []

        graph = cuda_graphs.ChunkGraph(functools.partial(point_gradients, problem)) \
            if cuda_graphs.requested(x.device, create_graph) and \
            not plan.slot.get("graph_failed") else None

        def graph_for(first: int, count: int) -> cuda_graphs.ChunkGraph | None:
            """The chunk graph for a full-size chunk once the size is settled (before the
            capture: while enough chunks are left to repay it; a new size drops the old
            graph)."""
            if graph is None or graph.failed or plan.measuring or plan.trials or \
                    count != plan.chunk:
                return None
            if graph.size not in (None, count):
                graph.reset()  # the chunk size changed (halved after an out-of-memory error)
            if graph.size is None and -(-(stop - first) // count) < cuda_graphs.MIN_CHUNKS:
                return None
            return graph

        def compute(first: int, count: int, measure: bool):
            def run():
                return path_gradients(problem, x, bl, rows, alphas, first, count, create_graph,
                                      check=not defer, graph=graph_for(first, count))
            # measure only while probing (saved-tensor hooks slow autograd down)
            if not measure:
                return run(), None
            return _measure(run, x.device, not getattr(problem, "serial_backward", False),
                            plan.one_point_budget(count))

        def consume(first: int, grads: torch.Tensor) -> None:
            if kept is not None:
                kept.check(first + grads.shape[-2] - start)
            if defer:
                flags.append((first, grads.shape[-2], _non_finite_points(grads).any()))
            if not sums:
                shape = grads.shape[:1] + x.shape if grads.dim() == 3 else x.shape
                sums.extend(torch.zeros(shape, dtype=accumulation_dtype(x.dtype),
                                        device=x.device) for _ in weight_sets)
            _accumulate(sums, grads, x, bl, weight_sets, alphas.shape[-1], first, create_graph)

        kept = memory.KeptGraphs(memory.parse_budget(max_memory, x.device), held, stop - start,
                                 x.device) if create_graph and max_memory is not None else None
        # (create_graph: the caller differentiates the sums again, so attention records math
        # kernels, which have a second derivative; the fused SDPA kernels have none)
        with kept or contextlib.nullcontext(), derivative.math_attention(problem.model) \
                if create_graph else contextlib.nullcontext():
            # (``progress`` last: the caller's value itself, not a truthy string's True,
            # reaches progress_bar's type check)
            run_chunks(plan, start, stop, compute, consume,
                       progress=distributed.is_root(process_group) and progress, bar=bar)
        if getattr(problem, "row_check_pending", False):  # every batch was one row (or alike)
            problem.finish_row_check_at_end()
            if problem.B > 1:  # a model that mixes rows is refused as before, though no batch
                problem.finish_row_check_now()  # here held two (one row and two more)
        if graph is not None and graph.failed:
            plan.slot["graph_failed"] = True  # later calls on this model and shape stay eager
        if flags and bool(torch.stack([f for _, _, f in flags]).any()):  # the one sync
            first, count = next((a, c) for a, c, f in flags if bool(f))
            path_gradients(problem, x, bl, rows, alphas, first, count, create_graph)  # raises
            raise FloatingPointError(
                f"non-finite gradients in the chunk of path points [{first}, {first + count}), "
                "which computed again without a CUDA graph are finite: "
                + ("a graph replay gave them (run without tk.cuda_graphs())"
                   if graph is not None else "the model's gradients are not reproducible"))
        if not sums:  # this rank's shard is empty: learn T from one forward
            sums = _empty_sums(problem, x, rows, len(weight_sets))
    if process_group is not None:
        distributed.reduce_sums(sums, process_group, reduce_to)
    return Integral(sums, total, plan.chunk or total, plan.cost)


def stream_pairs(problem, alphas: torch.Tensor, R: int, compute: Callable,
                 consume: Callable, sums: list[torch.Tensor], *, cost,
                 max_memory=None, chunk_size: int | None = None, progress: bool = False,
                 process_group=None, desc: str = "Hessian-vector products",
                 same_call: tuple = ()) -> int:
    """Stream the (path point ``p``, direction ``r``) pairs ``n = p R + r`` of an HVP method
    (``P = B K S`` points of ``problem``'s paths at nodes ``alphas``) through :func:`run_chunks`.

    A chunk is whole points ``[p0, p1)`` with all ``R`` directions, or one point with
    directions ``[r0, r1)``: ``compute(p0, p1, r0, r1)`` returns its result and
    ``consume(p0, p1, r0, r1, result)`` adds it to the caller's ``sums``, which are summed over
    ``process_group``'s ranks at the end (each rank takes a block of pairs). ``cost`` is the
    measured :class:`derivative.PairCost` (per pair, and fixed bytes held beside the pairs).
    ``same_call``: the caller's arguments that shape the sums beyond the points and their
    count of directions (the Hessian rows ``index``, the groups of a feature mask, the
    weights), checked to be the same on every rank. Returns the number of pairs.
    """
    if cost is None and chunk_size is None:
        raise ValueError("stream_pairs needs the measured cost of a pair or a chunk_size")
    x, bl = problem.x, problem.baselines
    total = x.shape[0] * bl.shape[1] * alphas.shape[-1] * R
    if process_group is not None:
        distributed.check_same_call(process_group, x, bl, alphas, R, _call_of(problem),
                                    same_call)
    with distributed.agreed_outcome(process_group, x.device):
        start, stop = (0, total) if process_group is None else \
            distributed.shard(total, process_group)
        plan = chunking.ChunkPlan(stop - start, x.device, chunk_size=chunk_size,
                                  max_memory=max_memory,
                                  cost=None if cost is None else cost.per_pair,
                                  reserved=0 if cost is None else int(cost.fixed),
                                  slot=chunking.cache_slot(problem, x, bl.shape[1], kind=f"hvp{R}"),
                                  # no share cap: it serves first-order memory against Captum's,
                                  # and split a small IH call (512 pairs) into 5-6 chunks, 2.6-3.9x
                                  # slower than one (measured, 2-core Xeon, 2026-11-30)
                                  max_share=None)

        def align(first: int, count: int) -> int:  # whole points, or directions of one point
            r = first % R
            return count - count % R if r == 0 and count >= R else min(count, R - r)

        def bounds(first: int, count: int) -> tuple[int, int, int, int]:
            p0, r0 = divmod(first, R)
            return (p0, p0 + count // R, 0, R) if r0 == 0 and count >= R else (p0, p0 + 1, r0,
                                                                                r0 + count)

        def chunk(first: int, count: int, measure: bool):  # the cost is given: never measured
            return (compute(*bounds(first, count)), count), None

        def fold(first: int, done) -> None:
            result, count = done
            consume(*bounds(first, count), result)

        run_chunks(plan, start, stop, chunk, fold, align=align,
                   progress=distributed.is_root(process_group) and progress, desc=desc,
                   unit="HVP")
    if process_group is not None:
        distributed.reduce_sums(sums, process_group, "all")
    return total


@torch.no_grad()
def _empty_sums(problem: PathProblem, x: torch.Tensor, rows: torch.Tensor,
                n: int) -> list[torch.Tensor]:
    """Zero sums ``[B', D]`` or ``[T, B', D]`` for a call that computes no path point."""
    out = problem.forward(x[:1], rows[:1])
    shape = out.shape[1:] + x.shape
    return [torch.zeros(shape, dtype=accumulation_dtype(x.dtype), device=x.device)
            for _ in range(n)]


# A no-grad forward's workspaces (a convolution's unfolded columns) are not saved tensors:
# a CNN's endpoint forwards of 2-10 rows peaked at 1.3-1.6x the saved-tensor estimate of
# :func:`_endpoint_row_bytes`, so their rows fit half of what the budget leaves. (They are a
# path point's forward without its backward, and fewer rows than the path's points.)
ENDPOINT_MARGIN = 2.0


@torch.no_grad()
def endpoint_values(problem: PathProblem, chunk: int = 256,
                    max_memory=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs at the inputs ``f(x) [B]`` and at every baseline ``f(b) [B, K]``
    (``[B, T]`` and ``[B, K, T]`` when ``problem.forward`` returns ``T`` outputs per point),
    without grad, in forwards of at most ``chunk`` rows (inputs and baselines together: fewer,
    larger model calls). With ``max_memory`` the rows per forward fit what the budget leaves
    beside the inputs and references (:func:`memory.budget_beside`; at least one row), from a
    measured forward of the first two rows (:func:`_endpoint_row_bytes`): expected gradients'
    or Shapley IG's many references ran in forwards of 256 rows, up to 12x a small budget.
    A check R deferred by ``make_problem(defer_row_check=True)`` compares row 0's output
    alone with its output in the first batch here (inputs first, so row 0 leads it)."""
    B, K = problem.B, problem.K
    total = B * (K + 1)
    if max_memory is not None:
        x = problem.x
        # beside the inputs and references, the path's sums (T per point): a budget they fill
        # raises here, before the row probe below runs a forward past it
        left = memory.budget_beside(memory.parse_budget(max_memory, x.device),
                                    x.nbytes + problem.baselines.nbytes + _sum_bytes(problem, x),
                                    x.device)
        per_row = ENDPOINT_MARGIN * _endpoint_row_bytes(problem, min(2, total), left)
        chunk = max(1, min(chunk, int(left // max(per_row, 1.0))))  # (a budget too small
        # for a row is too small for a path point: the path's plan raises on it just after)
    # rows that may couple (allow_row_coupling): the inputs and the references in separate
    # batches, as Captum's convergence delta runs them (one joint batch moved a train-mode
    # batch norm's delta by 0.11 from Captum's)
    bounds = [(0, B), (B, total)] if guards.row_coupling_allowed() else [
        (i, min(i + chunk, total)) for i in range(0, total, chunk)]
    out = None  # written in place: a list of small outputs kept between forwards pinned the
    # heap (136 one-row forwards of a CNN held 16 MB resident; 1.6 MB written in place)
    for i, j in bounds:
        part = problem.forward(*_endpoint_rows(problem, i, j))
        if out is None:
            out = part.new_empty((total,) + part.shape[1:],
                                 dtype=accumulation_dtype(problem.x.dtype))
        out[i:i + part.shape[0]] = part
        del part
    return out[:B], out[B:].reshape(B, K, *out.shape[1:])


def _endpoint_rows(problem: PathProblem, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``i:j`` of ``[x; b_11 .. b_1K; ..; b_BK]`` (a new ``[j - i, D]`` tensor) and their
    inputs' rows, without building the whole ``[B (K + 1), D]`` stack (slices, not masks: a
    small call runs this once)."""
    B, K, dev = problem.B, problem.K, problem.x.device
    parts, rows = [], []
    if i < B:
        parts.append(problem.x[i:min(j, B)])
        rows.append(torch.arange(i, min(j, B), device=dev))
    a, b = max(i, B) - B, j - B                       # reference rows r = input * K + k
    if b > a:
        bl, r = problem.baselines, torch.arange(a, b, device=dev)
        if bl.shape[0] > 1:
            parts.append(bl.reshape(B * K, -1)[a:b])
        elif K == 1:
            parts.append(bl[0, 0].expand(b - a, -1))
        else:
            parts.append(bl[0].index_select(0, r % K))
        rows.append(r // K)
    return torch.cat([p.to(problem.x.dtype) for p in parts]), torch.cat(rows)


def _endpoint_row_bytes(problem: PathProblem, n: int, left: int) -> float:
    """Bytes per row of a forward of the first ``n`` endpoint rows, its outputs dropped: on
    CUDA the allocator's peak, on the CPU the bytes a grad-enabled forward saves plus its
    points and outputs, times ``memory.CPU_TRANSIENT_FACTOR`` (a no-grad forward frees what a
    grad one keeps). As the first batch it checks the output and the target and may complete a
    deferred check R (:meth:`~taylor_kernels.engine.problem.PathProblem.forward`: as a probe,
    its one-row forward in the same grad mode, not counted). On the CPU the forward stops with
    ``MemoryError`` once it saved more than rows whose path points fit ``left`` bytes could
    (:func:`memory.saved_limit`)."""
    pts, rows = _endpoint_rows(problem, 0, n)
    if pts.is_cuda:
        _, used = guards.cuda_peak_bytes(lambda: problem.forward(pts, rows), pts.device)
    else:
        try:
            with torch.enable_grad(), memory.SavedBytes(memory.saved_limit(left, n)) as saved:
                out = problem.forward(pts.requires_grad_(True), rows)
        except memory.SavedPastLimit as past:
            raise MemoryError(f"max_memory leaves {left} bytes beside the inputs and "
                              f"references, too few for one path point: a forward of {n} "
                              f"row(s) saved {past.saved} bytes before it was stopped; raise "
                              "max_memory") from None
        used = memory.CPU_TRANSIENT_FACTOR * (saved.total + pts.nbytes + out.nbytes)
    return used / n
