"""Integrated Hessians and Expected Hessians (Janizek, Sturmfels, Lee, JMLR 2021) as one path
integral streamed through the derivative engine.

IG applied to IG, with ``Delta = x - b`` and ``p(t) = b + t Delta``, is the double integral
``Gamma_ij = Delta_i Delta_j int_0^1 int_0^1 a c H_ij(p(a c)) da dc
           + [i = j] Delta_i int_0^1 int_0^1 d_i f(p(a c)) da dc``.
The product ``t = a c`` of two uniforms has density ``-ln t`` on ``(0, 1]``, so
``int int h(a c) da dc = int_0^1 (-ln t) h(t) dt`` and (the single-integral reduction)

``Gamma_ij = Delta_i Delta_j int_0^1 (-t ln t) H_ij(p(t)) dt
           + [i = j] Delta_i int_0^1 (-ln t) d_i f(p(t)) dt``.

One quadrature over ``t`` serves both parts. Rules: ``"gausslog"`` (default), the ``steps``-node
Gauss rule for the weight ``-ln t`` (nodes ``t_s``, weights ``w_s``, exact for polynomials of
degree ``2 steps - 1`` against ``-ln t``; recurrence from the moments ``int t^k (-ln t) dt =
1/(k+1)^2`` in 50+ digit arithmetic): Hessian weights ``w_s t_s``, gradient weights ``w_s``.
``"gausslegendre"``: Gauss-Legendre nodes ``t_s`` and weights ``v_s`` with the weight function
folded in (Hessian ``v_s t_s (-ln t_s)``, gradient ``v_s (-ln t_s)``; converges only
algebraically because of the log singularity; kept for comparison).

Each path point ``p_s`` costs ``R`` Hessian-vector products (rows ``index`` of ``H``, ``R = D``
by default) and yields the gradient for free (forward-over-reverse returns both). The products
are reduced by the fused op ``ih_accumulate`` and the diagonal term by ``path_accumulate``.
Integration by parts (``d/dt [t d_i f(p(t))] = d_i f + t (H Delta)_i``) gives
``sum_j Gamma_ij = IG_i`` exactly; the result reports the largest deviation per input, against
IG computed separately (Gauss-Legendre, ``ig_steps`` nodes), as ``completeness_gap``.

Expected Hessians draw ``M`` references from a background set and one ``t = u1 u2`` (product of
two uniforms, i.e. density ``-ln t``) per sample: ``Gamma ~ mean_m [Delta_i Delta_j t_m H_ij +
[i = j] Delta_i d_i f]`` at ``p = r_m + t_m (x - r_m)``, the same estimator as the paper's
``(alpha, beta)`` sampling with half the random numbers reused.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from taylor_kernels import backends, ops
from taylor_kernels.attr.expected_gradients import draw_references
from taylor_kernels.attr.integrated_gradients import low_precision_note
from taylor_kernels.engine import derivative, memory, path_engine, quadrature
from taylor_kernels.engine.chunking import call_threads
from taylor_kernels.engine.distributed import (first_collective_agreed, resolve_group,
                                               warn_if_rows_couple)
from taylor_kernels.engine.problem import PathProblem, make_problem
from taylor_kernels.numerics import accumulation_dtype
from taylor_kernels.ops.hessian import ih_accumulate
from taylor_kernels.user_warnings import warn
from taylor_kernels.engine.guards import public_call

IH_RULES = ("gausslog", "gausslegendre")


@dataclass
class InteractionResult:
    """``interactions [B, R, D]`` (``Gamma_ij`` for rows ``index``, flattened features),
    ``ig [B, D]``, ``completeness_gap [B] = max_i |sum_j Gamma_ij - IG_i|``, ``index [R]`` and
    ``evaluations`` (Hessian-vector products plus IG gradient evaluations)."""

    interactions: torch.Tensor
    ig: torch.Tensor
    completeness_gap: torch.Tensor
    index: torch.Tensor
    evaluations: int


@functools.lru_cache(maxsize=None)
def _log_rule(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Gauss rule for ``int_0^1 g(t) (-ln t) dt``: Chebyshev algorithm on the moments
    ``1/(k+1)^2`` in high precision, then Golub-Welsch on the Jacobi matrix in float64."""
    import mpmath

    mp = mpmath.mp.clone() if hasattr(mpmath.mp, "clone") else mpmath.mp
    mp.dps = 60 + 2 * n  # the moment map loses about 1.5 n digits
    mu = [mp.mpf(1) / (k + 1) ** 2 for k in range(2 * n)]
    alpha, beta = [mu[1] / mu[0]], [mu[0]]
    prev, cur = [mp.mpf(0)] * (2 * n), list(mu)
    for k in range(1, n):
        nxt = [mp.mpf(0)] * (2 * n)
        for m in range(k, 2 * n - k):
            nxt[m] = cur[m + 1] - alpha[k - 1] * cur[m] - beta[k - 1] * prev[m]
        alpha.append(nxt[k + 1] / nxt[k] - cur[k] / cur[k - 1])
        beta.append(nxt[k] / cur[k - 1])
        prev, cur = cur, nxt
    a = np.array([float(v) for v in alpha])
    off = np.sqrt(np.array([float(v) for v in beta[1:]]))
    vals, vecs = np.linalg.eigh(np.diag(a) + np.diag(off, 1) + np.diag(off, -1))
    return tuple(vals.tolist()), tuple((float(beta[0]) * vecs[0] ** 2).tolist())


def ih_rule(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nodes ``t [S]``, gradient weights and Hessian weights (float64) of a rule for the
    single-integral form (see the module docstring)."""
    if rule not in IH_RULES:
        raise ValueError(f"unknown Integrated Hessians rule {rule!r}; choose one of {IH_RULES}")
    steps = quadrature.check_steps(steps)
    if rule == "gausslog":
        t, w = (torch.tensor(v, dtype=torch.float64) for v in _log_rule(steps))
        return t, w, w * t
    t, v = quadrature.nodes_and_weights("gausslegendre", steps)
    wg = v * -torch.log(t)
    return t, wg, wg * t


def point_fn(problem: PathProblem, rows: torch.Tensor):
    """``z [N, D] -> [N]``: the selected outputs at ``N`` points of inputs ``rows[:N]``."""
    return lambda z: problem.forward(z, rows[:z.shape[0]])


def _pair_cost(problem: PathProblem, alphas: torch.Tensor, budget,
               held: int = 0) -> derivative.PairCost:
    """Measured bytes of (path point, direction) HVP pairs, cached per model (its
    ``cost_owner``, e.g. the layer of a closure made per call) and shape; the probe stays
    within an explicit ``budget`` (what is left beside the ``held`` bytes)."""
    x, bl = problem.x, problem.baselines
    total, per_input = x.shape[0] * bl.shape[1] * alphas.shape[-1], bl.shape[1] * alphas.shape[-1]
    probe = ops.path_points(x, bl, alphas, 0, min(total, derivative.PROBE_ROWS))
    rows0 = torch.arange(probe.shape[0], device=x.device) // per_input
    owner = getattr(problem.model, "cost_owner", problem.model)
    return derivative.pair_cost(point_fn(problem, rows0), probe, owner=owner, budget=budget,
                                held=held, model=problem.model)


def path_slice(problem: PathProblem, alphas, p0: int, p1: int):
    """Points ``[p0, p1)`` of the paths with the inputs they belong to:
    ``(points [n, D], b_of [n], r0, r1, local)``; ``x[r0:r1]`` holds those inputs and ``local``
    is ``p0`` counted from input ``r0``'s first point."""
    x, bl = problem.x, problem.baselines
    per_input = bl.shape[1] * alphas.shape[-1]
    pts = ops.path_points(x, bl, alphas, p0, p1 - p0)
    b_of = torch.arange(p0, p1, device=x.device) // per_input
    r0, r1 = p0 // per_input, (p1 - 1) // per_input + 1
    return pts, b_of, r0, r1, p0 - r0 * per_input


def _per_path(w: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    return w[r0:r1] if w.dim() == 3 else w


def _stream(problem: PathProblem, alphas, w_grad, w_hess, idx, kw: dict) -> tuple:
    """Sum the Hessian part ``[B, R, D]`` and the diagonal gradient part ``[B, D]`` over all
    (path point, Hessian row) pairs through the engine's chunk loop."""
    x, bl = problem.x, problem.baselines
    B, D = x.shape
    acc = accumulation_dtype(x.dtype)
    hess = torch.zeros(B, idx.shape[0], D, dtype=acc, device=x.device)
    grad_part = torch.zeros(B, D, dtype=acc, device=x.device)

    def compute(p0, p1, d0, d1):
        pts, b_of, r0, r1, local = path_slice(problem, alphas, p0, p1)
        xs, bs = x[r0:r1], bl[r0:r1] if bl.shape[0] > 1 else bl
        sel = idx[d0:d1]
        V = derivative.unit_directions(sel, p1 - p0, D, x.dtype, x.device)
        g, hv = derivative.grad_and_hvp(point_fn(problem, b_of), pts, V)
        h = ih_accumulate(hv, xs, bs, _per_path(w_hess, r0, r1), sel, local)
        gp = ops.path_accumulate(g, xs, bs, _per_path(w_grad, r0, r1), local) if d0 == 0 \
            else None
        return r0, r1, h, gp

    def consume(p0, p1, d0, d1, result):
        r0, r1, h, gp = result
        hess[r0:r1, d0:d1] += h
        if gp is not None:
            grad_part[r0:r1] += gp

    n_hvp = path_engine.stream_pairs(problem, alphas, idx.shape[0], compute, consume,
                                     [hess, grad_part], same_call=(idx, w_grad, w_hess), **kw)
    return hess, grad_part, n_hvp


def engine_kw(problem: PathProblem, alphas, max_memory, chunk_size, progress,
              distributed, result_bytes: int = 0) -> dict:
    """Arguments of :func:`path_engine.stream_pairs` shared by the IH methods (the measured
    pair cost, the budget, the process group of ``distributed``). ``result_bytes`` (the
    call's sums) are held beside the chunks: an explicit budget they fill raises
    ``MemoryError`` before any HVP, and the rest is reserved in the cost's ``fixed`` part (a
    ``[4, 784, 784]`` result ran at 2.7x of a 4 MB budget)."""
    chunk_size = memory.check_chunk_size(chunk_size)
    group = resolve_group(distributed)
    warn_if_rows_couple(group)
    budget = memory.chunk_budget(chunk_size, max_memory, problem.x.device)
    cost = None
    if budget is not None:
        explicit = not isinstance(budget, memory.DefaultBudget)
        if explicit and result_bytes >= budget:
            raise MemoryError(f"max_memory of {budget} bytes cannot hold the call's result "
                              f"({result_bytes} bytes); raise max_memory or pass index= "
                              "for fewer rows")
        cost = _pair_cost(problem, alphas, budget - result_bytes if explicit else budget,
                          held=result_bytes if explicit else 0)
        if explicit:
            cost = derivative.PairCost(cost.per_pair, cost.fixed + result_bytes)
    return dict(cost=cost, max_memory=max_memory, chunk_size=chunk_size, progress=progress,
                process_group=group)


def separate_ig(problem: PathProblem, ig_steps: int, kw: dict) -> tuple[torch.Tensor, int]:
    """Gauss-Legendre IG ``[B, D]`` with ``ig_steps`` nodes (for the completeness gap) through
    the path engine, with the budget, chunk size and process group of ``kw`` (no share cap on
    the chunks, as for the HVP pairs: a small call in one chunk)."""
    gl_t, gl_w = quadrature.nodes_and_weights("gausslegendre", ig_steps)
    ig = path_engine.integrate(problem, gl_t, [gl_w], max_memory=kw["max_memory"],
                               chunk_size=kw["chunk_size"], progress=kw["progress"],
                               process_group=kw["process_group"], max_share=None)
    return ig.sums[0], ig.evaluations


def _integrate(problem: PathProblem, alphas, w_grad, w_hess, index, ig_steps, max_memory,
               chunk_size, progress, distributed) -> InteractionResult:
    idx = derivative.index_rows(index, problem.x.shape[1], problem.x.device)
    B, D = problem.x.shape
    acc = accumulation_dtype(problem.x.dtype).itemsize  # hess [B, R, D] and grad_part [B, D]
    kw = engine_kw(problem, alphas, max_memory, chunk_size, progress, distributed,
                   result_bytes=B * (idx.shape[0] + 1) * D * acc)
    ig_flat, n_ig = separate_ig(problem, ig_steps, kw)  # (first: its chunks fit the budget
    hess, grad_part, n_hvp = _stream(problem, alphas, w_grad, w_hess, idx, kw)  # with no
    r = torch.arange(idx.shape[0], device=idx.device)  # result beside them)
    hess[:, r, idx] += grad_part[:, idx]
    gap = (hess.sum(2) - ig_flat[:, idx]).abs().amax(dim=1)
    return InteractionResult(hess, ig_flat, gap, idx, n_hvp + n_ig)


GAP_WARNING = 1e-2  # relative: float32 rounding stays near 1e-6 here, a converged rule far below
# bfloat16 rounding held converged gaps of 0.6-2.3% of max|IG| on HF models (QA, 2026-12-03);
# 50 ulps (39%) let an 8-step bf16 Llama IH 3.9% off (gap 8.7%) pass without a word
LOW_PRECISION_ULPS = 8


def warn_if_rows_miss_ig(gap: torch.Tensor, ig: torch.Tensor, rule: str, steps: int,
                         dtype: torch.dtype) -> None:
    """A ``RuntimeWarning`` when ``gap [B]`` (``max_i |sum_j Gamma_ij - IG_i|``) passes
    ``GAP_WARNING`` (8 ulps in bfloat16: 6.25%) of the row's ``max_i |IG_i|`` (``ig
    [B, D]``). Rows not summing to IG mean an integral that has not converged, or a
    piecewise-linear model (ReLU, max pooling, ...): its Hessian is zero between the kinks, so
    every interaction through a kink is lost (the rows then sum to part of IG, silently)."""
    limit = max(GAP_WARNING, LOW_PRECISION_ULPS * torch.finfo(dtype).eps)
    scale = ig.abs().amax(dim=1).to(gap.dtype).clamp_min(torch.finfo(gap.dtype).tiny)
    rel = gap / scale
    bad = rel > limit
    if bad.any():
        warn(f"integrated Hessians: for {int(bad.sum())} input(s) the rows of the interaction "
             f"matrix miss IG by up to {float(rel[bad].max()):.3g} of max|IG| "
             f"(completeness_gap): with rule {rule!r} and {steps} steps the integral has not "
             "converged, or the model is piecewise linear (ReLU, max pooling, ...), whose "
             "Hessian is zero between its kinks, so the interactions through them are lost; "
             "use more steps, or a smooth activation (softplus), which Integrated Hessians "
             "assumes" + low_precision_note(dtype), RuntimeWarning)


@public_call
@first_collective_agreed
@call_threads()
def integrated_hessians(model, inputs, baselines=None, target=None, *, steps: int = 16,
                        rule: str = "gausslog", index=None, ig_steps: int = 32,
                        additional_forward_args=None, max_memory=None,
                        chunk_size: int | None = None, backend: str | None = None,
                        progress: bool = False, distributed=False) -> InteractionResult:
    """Integrated Hessians ``Gamma_ij`` (IG of IG) by the single-integral reduction.

    Args:
        model, inputs, baselines, target, additional_forward_args: as
            :func:`taylor_kernels.integrated_gradients` (``K`` baselines per input are
            averaged). Features are flattened and concatenated over tuple inputs (``D``).
        steps, rule: ``"gausslog"`` (Gauss rule for the weight ``-ln t``, default; 16 nodes
            integrate degree-31 polynomials exactly) or ``"gausslegendre"``.
        index: flattened feature numbers ``[R]`` whose rows ``Gamma_{i, :}`` to compute (each
            costs one HVP per path point); None for all ``D``.
        ig_steps: Gauss-Legendre nodes of the separate IG used for ``completeness_gap``.
        max_memory / chunk_size: budget (bytes or ``"512MB"``) or fixed (point, row) pairs per
            chunk (also the points per chunk of the separate IG); backend: force a kernel
            backend; progress: tqdm bar over HVPs.
        distributed: ``True`` (default process group) or a ``ProcessGroup``: shard the
            (point, row) pairs and the IG points over its ranks; every rank passes the same
            arguments (``index`` too: checked) and gets the whole result.
    Returns:
        :class:`InteractionResult`: ``interactions [B, R, D]``, ``ig [B, D]``,
        ``completeness_gap [B]`` (``max_i |sum_j Gamma_ij - IG_i|``), ``index``,
        ``evaluations``; a ``RuntimeWarning`` when a gap passes 1% of the row's ``max|IG|``
        (:func:`warn_if_rows_miss_ig`: too few steps, or a piecewise-linear model).
    """
    t, wg, wh = ih_rule(rule, steps)
    with backends.selected(backend):
        problem = make_problem(model, inputs, baselines, target, additional_forward_args,
                               higher_order="integrated/expected Hessians")
        dev = problem.x.device
        res = _integrate(problem, t.to(dev), wg.to(dev), wh.to(dev), index, ig_steps,
                         max_memory, chunk_size, progress, distributed)
    warn_if_rows_miss_ig(res.completeness_gap, res.ig[:, res.index], rule, steps,
                         problem.x.dtype)
    return res


@public_call
@first_collective_agreed
@call_threads()
def expected_hessians(model, inputs, background, target=None, *, samples: int = 100,
                      seed: int | None = None, index=None, ig_steps: int = 32,
                      additional_forward_args=None, max_memory=None,
                      chunk_size: int | None = None, backend: str | None = None,
                      progress: bool = False, distributed=False) -> InteractionResult:
    """Expected Hessians: ``M = samples`` references ``r_m`` from ``background [N, ...]``
    (uniform, with replacement) and ``t_m = u1 u2`` per input (private generator seeded with
    ``seed``); ``Gamma_ij ~ mean_m [Delta_i Delta_j t_m H_ij(p_m) + [i = j] Delta_i d_i f(p_m)]``.

    ``ig`` is IG averaged over the same references (Gauss-Legendre, ``ig_steps``), so
    ``completeness_gap`` measures the Monte-Carlo error in ``t`` alone. Other arguments as
    :func:`integrated_hessians`.
    """
    with backends.selected(backend):
        problem = make_problem(model, inputs, None, target, additional_forward_args,
                               higher_order="integrated/expected Hessians")
        build, gen = draw_references(problem, background, samples, seed)
        problem.baselines = build(0, int(samples))
        t = (torch.rand(problem.B, int(samples), 1, generator=gen, dtype=torch.float64)
             * torch.rand(problem.B, int(samples), 1, generator=gen, dtype=torch.float64))
        dev = problem.x.device
        return _integrate(problem, t.to(dev), torch.ones(1, dtype=torch.float64, device=dev),
                          t.to(dev), index, ig_steps, max_memory, chunk_size, progress,
                          distributed)
