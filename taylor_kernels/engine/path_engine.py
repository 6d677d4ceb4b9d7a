"""The path engine: streams ``inputs x baselines x nodes`` through the model in chunks.

For a chunk ``[start, start+count)`` of flattened path points ``n = (b*K + k)*S + s`` it builds
the points with ``ops.path_points``, runs forward and backward once, checks the gradients, and
reduces them with ``ops.path_accumulate`` into one ``[B, D]`` sum per weight vector (several
weight vectors share one set of gradients: nested rules, or the ``(1 - t)`` / ``-t ln t``
integrals). Chunks are sized to a memory budget from a measured per-point cost and halved on
out-of-memory. The engine never knows which attribution method is running.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from taylor_kernels import ops
from taylor_kernels.engine import distributed, memory
from taylor_kernels.engine.problem import PathProblem
from taylor_kernels.reference.path import accumulation_dtype

PROBE_POINTS = 8


@dataclass
class Integral:
    """Result of :func:`integrate`: one ``[B', D]`` sum per weight vector, and the cost
    (``point_cost``: measured bytes per path point, reusable by a later call on the model)."""

    sums: list[torch.Tensor]
    evaluations: int
    chunk_size: int
    point_cost: float | None = None


class _Chunks:
    """Iterates the chunk loop: a first probe of 1 point, then ``PROBE_POINTS``, then budget
    (no probes when the per-point cost is already known)."""

    def __init__(self, total: int, chunk_size: int | None, budget: int | None,
                 point_cost: float | None = None):
        self.total, self.chunk, self.budget = total, chunk_size, budget
        self.probes: list[tuple[int, float]] = []
        self.cost = point_cost
        if self.chunk is None and point_cost is not None:
            self.chunk = memory.chunk_size_for(budget, point_cost, total)

    def point_cost(self) -> float | None:
        """Bytes per point: given, or from the probes (slope of two, else the mean of one)."""
        if self.cost is None and self.probes:
            (n1, m1), (n2, m2) = self.probes[0], self.probes[-1]
            self.cost = (m2 - m1) / (n2 - n1) if n2 > n1 and m2 > m1 else m2 / max(n2, 1)
        return self.cost

    def next_count(self, start: int) -> int:
        left = self.total - start
        if self.chunk is None and not self.probes:
            return min(left, 1)
        if self.chunk is None and len(self.probes) == 1:
            # the one-point cost over-estimates (fixed costs such as saved weights count fully),
            # so the second probe stays within the budget at up to that many points
            fits = memory.chunk_size_for(self.budget, self.probes[0][1], self.total)
            if fits < 2:
                self.chunk = 1
            else:
                return min(left, PROBE_POINTS, fits)
        if self.chunk is None:
            self.chunk = memory.chunk_size_for(self.budget, self.point_cost(), self.total)
        return min(left, self.chunk)


def _measure(run, count: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """Run ``run()`` and return its result with the bytes it needed beyond what was live."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = run()
        return out, float(torch.cuda.max_memory_allocated(device) - before)
    with memory.SavedBytes() as saved:
        out = run()
    return out, memory.cpu_point_cost(saved.total, out.numel() * out.element_size())


def path_gradients(problem: PathProblem, x: torch.Tensor, bl: torch.Tensor, rows: torch.Tensor,
                   alphas: torch.Tensor, start: int, count: int,
                   create_graph: bool = False) -> torch.Tensor:
    """Gradients ``[count, D]`` of the selected output at path points ``[start, start+count)``.

    ``rows`` ``[B']`` maps the local inputs of ``x [B', D]`` to the problem's inputs (target
    and additional forward args). Raises on a missing gradient path or non-finite gradients.
    """
    K, S = bl.shape[1], alphas.shape[-1]
    pts = ops.path_points(x, bl, alphas, start, count).requires_grad_(True)
    local = torch.arange(start, start + count, device=x.device) // (K * S)
    with torch.enable_grad():
        out = problem.forward(pts, rows[local])
        if not out.requires_grad:
            raise ValueError("the model output does not depend on the inputs (no gradient "
                             "path); check that the model uses its inputs and is not under "
                             "torch.no_grad")
        (grad,) = torch.autograd.grad(out.sum(), pts, create_graph=create_graph,
                                      allow_unused=True)
    if grad is None:
        raise ValueError("the model output does not depend on the inputs (no gradient path)")
    bad = ~torch.isfinite(grad).all(dim=1)
    if bad.any():
        n = start + int(bad.nonzero()[0])
        b, k, s = n // (K * S), (n // S) % K, n % S
        alpha = alphas[s] if alphas.dim() == 1 else alphas[b, k, s]
        raise FloatingPointError(
            f"non-finite gradient at path node: input {int(rows[b])}, baseline {k}, "
            f"alpha={float(alpha):.6g} (flattened point {n})")
    return grad


def _accumulate(sums: list[torch.Tensor], grads: torch.Tensor, x: torch.Tensor, bl: torch.Tensor,
                weight_sets: list[torch.Tensor], S: int, start: int, create_graph: bool) -> None:
    """Add one chunk into ``sums``, passing ``path_accumulate`` only the rows the chunk touches
    (a chunk spans few inputs; the op's ``[B, D]`` output would otherwise make every chunk cost
    ``O(B D)`` and the whole call ``O(B^2)``)."""
    per_input = bl.shape[1] * S
    r0, r1 = start // per_input, (start + grads.shape[0] - 1) // per_input + 1
    xs = x[r0:r1]
    bs = bl[r0:r1] if bl.shape[0] > 1 else bl
    local = start - r0 * per_input
    rows = torch.arange(r0, r1, device=x.device)
    for i, w in enumerate(weight_sets):
        part = ops.path_accumulate(grads, xs, bs, w[r0:r1] if w.dim() == 3 else w, local)
        if create_graph:
            sums[i] = sums[i].index_add(0, rows, part)
        else:
            sums[i][r0:r1].add_(part)


def integrate(problem: PathProblem, alphas: torch.Tensor, weight_sets: list[torch.Tensor], *,
              x: torch.Tensor | None = None, baselines: torch.Tensor | None = None,
              rows: torch.Tensor | None = None, max_memory=None, chunk_size: int | None = None,
              progress: bool = False, create_graph: bool = False, process_group=None,
              reduce_to="all", point_cost: float | None = None) -> Integral:
    """Sum ``w_s * grad f(p) * (x - b_k) / K`` over all path points, for each weight vector.

    Args: ``alphas [S]`` or ``[B', K, S]`` nodes; ``weight_sets`` list of ``[S]`` or
    ``[B', K, S]`` weights; optional subset
    ``x [B', D]``, ``baselines [Bb', K, D]`` with ``rows [B']`` (defaults: the whole problem);
    ``max_memory`` bytes or ``"512MB"``; ``chunk_size`` fixes the points per chunk;
    ``point_cost`` (bytes per point, from an earlier :class:`Integral`) skips the probes.
    ``process_group``: shard the points over its ranks and sum there (``reduce_to`` ``"all"``
    or ``0``; see :mod:`taylor_kernels.engine.distributed`).
    Returns: :class:`Integral` with one ``[B', D]`` sum per weight vector.
    """
    x = problem.x if x is None else x
    bl = problem.baselines if baselines is None else baselines
    rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
    alphas = alphas.to(x.device)
    weight_sets = [w.to(x.device) for w in weight_sets]
    total = x.shape[0] * bl.shape[1] * alphas.shape[-1]
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    budget = None if chunk_size else memory.parse_budget(max_memory, x.device)
    chunks = _Chunks(total, chunk_size, budget, point_cost if not chunk_size else None)
    sums = [torch.zeros(x.shape, dtype=accumulation_dtype(x.dtype), device=x.device)
            for _ in weight_sets]
    start, stop = (0, total) if process_group is None else distributed.shard(total, process_group)
    chunks.total = stop
    with tqdm(total=stop - start, disable=not progress, desc="path points", unit="pt") as bar:
        while start < stop:
            count = chunks.next_count(start)
            def run():
                return path_gradients(problem, x, bl, rows, alphas, start, count, create_graph)
            try:  # measure only while probing (saved-tensor hooks slow autograd down)
                grads, used = _measure(run, count, x.device) if chunks.chunk is None \
                    else (run(), 0.0)
            except Exception as exc:  # halve on OOM, re-raise anything else
                if not memory.is_oom(exc) or count == 1:
                    raise
                chunks.chunk = max(1, count // 2)
                continue
            if chunks.chunk is None:
                chunks.probes.append((count, used))
            _accumulate(sums, grads, x, bl, weight_sets, alphas.shape[-1], start, create_graph)
            start += count
            bar.update(count)
    if process_group is not None:
        distributed.reduce_sums(sums, process_group, reduce_to)
    return Integral(sums, total, chunks.chunk or total, chunks.point_cost())


@torch.no_grad()
def endpoint_values(problem: PathProblem, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs at the inputs ``f(x) [B]`` and at every baseline ``f(b) [B, K]``."""
    B, K, D = problem.B, problem.K, problem.x.shape[1]
    rows = torch.arange(B, device=problem.x.device)
    fx = torch.cat([problem.forward(problem.x[i:i + chunk], rows[i:i + chunk])
                    for i in range(0, B, chunk)])
    bl = problem.baselines.expand(B, K, D).reshape(B * K, D)
    brows = rows.repeat_interleave(K)
    fb = torch.cat([problem.forward(bl[i:i + chunk], brows[i:i + chunk])
                    for i in range(0, B * K, chunk)])
    acc = accumulation_dtype(problem.x.dtype)
    return fx.to(acc), fb.to(acc).reshape(B, K)
