"""Integrated Hessians between groups of features (tokens, patches, superpixels).

For groups ``P, Q`` of a feature mask, the group interaction is the sum of the feature
interactions ``Gamma_PQ = sum_{i in P, j in Q} Gamma_ij``. With the single-integral form of
:mod:`taylor_kernels.attr.integrated_hessians` and ``u_P = Delta * 1_P`` (the input-baseline
difference restricted to ``P``):

``Gamma_PQ = int_0^1 (-t ln t) u_P^T H(p(t)) u_Q dt + [P = Q] int_0^1 (-ln t) u_P . grad f(p(t)) dt``

so each path point costs ``G`` Hessian-vector products ``H u_Q`` (not ``D``): a transformer's
token interactions need one HVP per token, not one per embedding coordinate. Completeness holds
per group: ``sum_Q Gamma_PQ = IG_P = sum_{i in P} IG_i``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from taylor_kernels import backends
from taylor_kernels.attr.integrated_hessians import (engine_kw, ih_rule, path_slice, point_fn,
                                                     separate_ig, warn_if_rows_miss_ig)
from taylor_kernels.attr.shapley_ig import feature_groups
from taylor_kernels.engine import derivative, path_engine
from taylor_kernels.engine.chunking import call_threads
from taylor_kernels.engine.distributed import first_collective_agreed
from taylor_kernels.engine.problem import make_problem
from taylor_kernels.numerics import accumulation_dtype
from taylor_kernels.engine.guards import public_call


@dataclass
class GroupInteractions:
    """``interactions [B, G, G]`` (``Gamma_PQ``, symmetric), ``ig [B, G]`` (group IG from a
    separate Gauss-Legendre IG), ``completeness_gap [B] = max_P |sum_Q Gamma_PQ - IG_P|``,
    ``evaluations`` (Hessian-vector products plus IG gradients)."""

    interactions: torch.Tensor
    ig: torch.Tensor
    completeness_gap: torch.Tensor
    evaluations: int


def _chunk_terms(problem, pts, start, onehot, w_grad, w_hess, group_block, f):
    """Hessian ``[count, G, g]`` and gradient ``[count, G]`` terms of one chunk of points."""
    x, bl = problem.x, problem.baselines
    K, S = bl.shape[1], w_hess.shape[0]
    n = torch.arange(start, start + pts.shape[0], device=x.device)
    b, k, s = n // (K * S), (n // S) % K, n % S
    delta = x[b] - bl[b if bl.shape[0] > 1 else torch.zeros_like(b), k]     # [count, D]
    U = onehot[group_block].unsqueeze(0) * delta.unsqueeze(1)               # [count, g, D]
    g, hv = derivative.grad_and_hvp(f, pts, U)                               # hv [count, g, D]
    del U
    acc = accumulation_dtype(x.dtype)
    wh, wg = (w_hess[s] / K).to(acc), (w_grad[s] / K).to(acc)
    # sum_d [d in P] delta_d (H U_Q)_d by one product with the indicators: the directions of
    # all G groups, [count, G, D], were built for every chunk (1.5x of a 4 MB budget)
    ind = onehot.T.to(acc)                                                   # [D, G]
    hess = ((delta.unsqueeze(1).to(acc) * hv.to(acc)) @ ind).transpose(1, 2) * wh[:, None, None]
    grad = ((delta.to(acc) * g.to(acc)) @ ind) * wg[:, None]
    return b, hess, grad


@public_call
@first_collective_agreed
@call_threads()
def group_integrated_hessians(model, inputs, feature_mask, baselines=None, target=None, *,
                              steps: int = 16, rule: str = "gausslog", ig_steps: int = 32,
                              additional_forward_args=None, max_memory=None,
                              chunk_size: int | None = None, backend: str | None = None,
                              progress: bool = False, distributed=False) -> GroupInteractions:
    """Integrated Hessians summed over feature groups, at ``G`` HVPs per path point.

    Args:
        model, inputs, baselines, target, additional_forward_args: as
            :func:`taylor_kernels.integrated_gradients` (``K`` baselines are averaged).
        feature_mask: integer group ids ``0..G-1`` shaped like one input (or a tuple).
        steps, rule: the single-integral quadrature (``"gausslog"`` or ``"gausslegendre"``);
        ig_steps: Gauss-Legendre nodes of the IG used for ``completeness_gap``.
        max_memory / chunk_size: budget or fixed (point, group) HVP pairs per chunk;
        backend: force a kernel backend; progress: tqdm bar; distributed: as
            :func:`taylor_kernels.integrated_hessians`.
    Returns: :class:`GroupInteractions` (a ``RuntimeWarning`` when a row misses IG, as
    :func:`~taylor_kernels.integrated_hessians`).
    """
    t, w_grad, w_hess = ih_rule(rule, steps)
    with backends.selected(backend):
        problem = make_problem(model, inputs, baselines, target, additional_forward_args,
                               higher_order="group integrated Hessians")
        x, dev = problem.x, problem.x.device
        groups = feature_groups(feature_mask, problem.inputs)
        G, D = int(groups.max()) + 1, groups.numel()
        t, w_grad, w_hess = t.to(dev), w_grad.to(dev), w_hess.to(dev)
        acc = accumulation_dtype(x.dtype)
        held = problem.B * (G + 1) * G * acc.itemsize + G * D * x.element_size()  # out,
        kw = engine_kw(problem, t, max_memory, chunk_size, progress, distributed,  # diag,
                       result_bytes=held)  # indicators: checked before they are made (an
        # int64 one_hot of them came first: 3.7 MB before a 64 KB budget's MemoryError)
        onehot = torch.zeros(G, D, dtype=x.dtype, device=dev)                 # [G, D]
        onehot[groups, torch.arange(D, device=dev)] = 1
        out = torch.zeros(problem.B, G, G, dtype=acc, device=dev)
        diag = torch.zeros(problem.B, G, dtype=acc, device=dev)

        def compute(p0, p1, q0, q1):
            pts, b_of, *_ = path_slice(problem, t, p0, p1)
            return _chunk_terms(problem, pts, p0, onehot, w_grad, w_hess, slice(q0, q1),
                                point_fn(problem, b_of))

        def consume(p0, p1, q0, q1, result):
            b, hess, grad = result
            out[:, :, q0:q1].index_add_(0, b, hess)
            if q0 == 0:
                diag.index_add_(0, b, grad)

        ig, n_ig = separate_ig(problem, ig_steps, kw)  # (before the pairs, as in IH)
        n_hvp = path_engine.stream_pairs(problem, t, G, compute, consume, [out, diag],
                                         same_call=(groups, w_grad, w_hess), **kw)
        out += torch.diag_embed(diag)
        ig_groups = ig @ onehot.T.to(ig.dtype)                                # [B, G]
    gap = (out.sum(2) - ig_groups).abs().amax(dim=1)
    warn_if_rows_miss_ig(gap, ig_groups, rule, steps, x.dtype)
    return GroupInteractions(out, ig_groups, gap, n_hvp + n_ig)
