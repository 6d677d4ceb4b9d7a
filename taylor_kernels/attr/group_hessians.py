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

import contextlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from taylor_kernels import backends, ops
from taylor_kernels.attr.integrated_hessians import _chunking, _point_fn, ih_rule
from taylor_kernels.attr.shapley_ig import feature_groups
from taylor_kernels.engine import derivative, path_engine, quadrature
from taylor_kernels.engine.problem import make_problem
from taylor_kernels.reference.path import accumulation_dtype


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
    U = onehot.unsqueeze(0) * delta.unsqueeze(1)                            # [count, G, D]
    g, hv = derivative.grad_and_hvp(f, pts, U[:, group_block])               # hv [count, g, D]
    acc = accumulation_dtype(x.dtype)
    wh, wg = (w_hess[s] / K).to(acc), (w_grad[s] / K).to(acc)
    hess = torch.einsum("cpd,cqd->cpq", U.to(acc), hv.to(acc)) * wh[:, None, None]
    grad = (U.to(acc) * g.to(acc).unsqueeze(1)).sum(-1) * wg[:, None]
    return b, hess, grad


def group_integrated_hessians(model, inputs, feature_mask, baselines=None, target=None, *,
                              steps: int = 16, rule: str = "gausslog", ig_steps: int = 32,
                              additional_forward_args=None, max_memory=None,
                              backend: str | None = None,
                              progress: bool = False) -> GroupInteractions:
    """Integrated Hessians summed over feature groups, at ``G`` HVPs per path point.

    Args:
        model, inputs, baselines, target, additional_forward_args: as
            :func:`taylor_kernels.integrated_gradients` (``K`` baselines are averaged).
        feature_mask: integer group ids ``0..G-1`` shaped like one input (or a tuple).
        steps, rule: the single-integral quadrature (``"gausslog"`` or ``"gausslegendre"``);
        ig_steps: Gauss-Legendre nodes of the IG used for ``completeness_gap``.
        max_memory: budget for one chunk of (point, group) HVP pairs; progress: tqdm bar.
    Returns: :class:`GroupInteractions`.
    """
    t, w_grad, w_hess = ih_rule(rule, steps)
    ctx = backends.using(backend) if backend else contextlib.nullcontext()
    with ctx:
        problem = make_problem(model, inputs, baselines, target, additional_forward_args)
        x, dev = problem.x, problem.x.device
        groups = feature_groups(feature_mask, problem.inputs)
        G = int(groups.max()) + 1
        onehot = torch.nn.functional.one_hot(groups, G).T.to(x.dtype)      # [G, D]
        t, w_grad, w_hess = t.to(dev), w_grad.to(dev), w_hess.to(dev)
        B, total = problem.B, problem.B * problem.K * t.shape[0]
        pts_per, dirs, ig_chunk = _chunking(problem, t, G, B * problem.K * ig_steps,
                                            max_memory, None)
        acc = accumulation_dtype(x.dtype)
        out = torch.zeros(B, G, G, dtype=acc, device=dev)
        diag = torch.zeros(B, G, dtype=acc, device=dev)
        with tqdm(total=total * G, disable=not progress, desc="group HVPs") as bar:
            for start in range(0, total, pts_per):
                count = min(pts_per, total - start)
                pts = ops.path_points(x, problem.baselines, t, start, count)
                rows = torch.arange(start, start + count, device=dev) // (total // B)
                f = _point_fn(problem, rows)
                for q0 in range(0, G, dirs):
                    block = slice(q0, min(G, q0 + dirs))
                    b, hess, grad = _chunk_terms(problem, pts, start, onehot, w_grad, w_hess,
                                                 block, f)
                    out[:, :, block].index_add_(0, b, hess)
                    if q0 == 0:
                        diag.index_add_(0, b, grad)
                    bar.update(count * hess.shape[2])
        out += torch.diag_embed(diag)
        gl_t, gl_w = quadrature.nodes_and_weights("gausslegendre", ig_steps)
        ig = path_engine.integrate(problem, gl_t, [gl_w], chunk_size=ig_chunk).sums[0]
        ig_groups = ig @ onehot.T.to(ig.dtype)                                # [B, G]
    gap = (out.sum(2) - ig_groups).abs().amax(dim=1)
    return GroupInteractions(out, ig_groups, gap, total * G + B * problem.K * ig_steps)
