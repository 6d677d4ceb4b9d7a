"""Shapley Integrated Gradients (SIG, Liu et al., arXiv 2310.04821): IG over coalition baselines.

Exact Shapley values give every coalition size ``k = 0..n-1`` the same total weight ``1/n``,
spread evenly over its ``C(n-1, k)`` coalitions. SIG mimics that with a *set* of baselines.
Sampling rule implemented here ("proportional sampling"): the ``M`` coalitions' sizes are
allocated to ``0..n-1`` in proportion to those equal weights (stratified: size of coalition
``m`` is ``floor(m * n / M)``, so each size gets ``M/n`` coalitions, or is spread evenly when
``M < n``); each coalition is then drawn uniformly among the subsets of that size,
independently per input. Baseline ``b_S`` keeps the features (groups) in ``S`` at the input
and sets the rest to the reference. Attributions are the mean of IG from each ``b_S`` to
``x``; their sum is ``mean_S (f(x) - f(b_S))``, so compare SIG by attribution *proportions*.
"""
from __future__ import annotations


import torch

from taylor_kernels import backends
from taylor_kernels.attr.integrated_gradients import AttributionResult, check_max_regions
from taylor_kernels.engine import path_engine, quadrature, reference_groups
from taylor_kernels.engine.chunking import call_threads
from taylor_kernels.engine.derivative import flex_runs_eager_on_cpu
from taylor_kernels.engine.problem import as_tuple, make_problem
from taylor_kernels.numerics import check_dense_real, seeded_generator
from taylor_kernels.engine.guards import public_call


def feature_groups(feature_mask, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Group id per flattened feature ``[D]`` (default: every feature its own group).

    ``feature_mask``: integer tensor shaped like one input (or ``[1, ...]``), or a tuple of
    them; ids are shared across a tuple's tensors (as in Captum) and must be ``0..G-1``.
    """
    D = sum(t[0].numel() for t in inputs)
    if feature_mask is None:
        return torch.arange(D, device=inputs[0].device)
    masks = as_tuple(feature_mask)[0] if not isinstance(feature_mask, torch.Tensor) else (
        feature_mask,)
    if len(masks) != len(inputs):
        raise ValueError(f"{len(masks)} feature masks for {len(inputs)} inputs")
    parts = []
    for i, (m, x) in enumerate(zip(masks, inputs)):
        check_dense_real(m, f"feature mask {i}")
        feat = tuple(x.shape[1:])
        if m.is_floating_point() or m.is_complex() or m.dtype == torch.bool:
            raise TypeError(f"feature mask {i} must hold integer group ids, got {m.dtype}")
        if m.numel() != x[0].numel() or tuple(m.shape) not in (feat, (1,) + feat):
            raise ValueError(f"feature mask {i} of shape {tuple(m.shape)} must be shaped "
                             f"{feat} or (1, *{feat})")
        parts.append(m.reshape(-1).to(x.device, torch.long))
    groups = torch.cat(parts)
    ids = torch.unique(groups)
    if ids.min() != 0 or ids.max() != ids.numel() - 1:
        raise ValueError(f"feature mask ids must be 0..G-1, got {ids.tolist()[:10]}...")
    return groups


def coalition_sizes(n: int, coalitions: int) -> torch.Tensor:
    """Stratified sizes ``floor(m n / M)`` for ``m < M``: equal share per size ``0..n-1``."""
    return torch.arange(coalitions) * n // coalitions


# Elements per block of the coalition draw: the whole [B, M, n] draw and its sort's int64
# ranks and temporaries took 4x the draw at once (6 MB for a CNN's 16 coalitions of 3,072
# pixel players, B = 8, beside a 4 MB budget); a block takes about 0.3 MB. The blocks consume
# the generator's stream in the same order as one draw, so a seed gives the same coalitions.
SORT_BLOCK = 2**14


def sample_coalitions(B: int, n: int, coalitions: int, gen: torch.Generator) -> torch.Tensor:
    """Boolean ``[B, M, n]``: coalition ``m`` of input ``b``, uniform among sets of its size
    (the first ``size`` players of a random permutation, drawn in blocks of rows)."""
    sizes = coalition_sizes(n, coalitions)
    total = B * coalitions
    present = torch.empty(total, n, dtype=torch.bool)
    rows = max(1, SORT_BLOCK // max(n, 1))
    for i in range(0, total, rows):
        j = min(i + rows, total)
        order = torch.rand(j - i, n, generator=gen, dtype=torch.float32).argsort(dim=1)  # (the
        # same draws whatever the default dtype)
        present[i:j] = order < sizes[torch.arange(i, j) % coalitions].view(-1, 1)
    return present.view(B, coalitions, n)


@public_call
@flex_runs_eager_on_cpu  # (no backward through it on the CPU)
@call_threads()
def shapley_integrated_gradients(model, inputs, reference=None, target=None, *,
                                 coalitions: int = 32, feature_mask=None,
                                 seed: int | None = None, steps: int = 32,
                                 rule: str = "gausslegendre", additional_forward_args=None,
                                 max_memory=None, backend: str | None = None,
                                 progress: bool = False,
                                 chunk_size: int | None = None,
                                 max_regions: int | None = None,
                                 gap: bool = True) -> AttributionResult:
    """SIG: mean IG from ``coalitions`` coalition baselines ``b_S = x on S, reference off S``.

    Args:
        model, inputs, target, additional_forward_args: as :func:`integrated_gradients`.
        reference: the "absent" value (None = zeros, a number, or a tensor shaped like one
            input or like the batch); one reference per input.
        coalitions: ``M``, baselines per input; feature_mask: feature groups (players);
        seed: seeds the coalition draws; steps, rule: the quadrature of each IG (or
            ``"exact"`` for piecewise-linear models, capped at ``max_regions`` regions per
            path; :mod:`taylor_kernels.attr.exact_ig`).
        max_memory, chunk_size, backend, progress: as :func:`integrated_gradients`.
        gap: False skips the forwards the gap needs (``gap`` NaN; the exact rule runs them).
    Returns:
        :class:`AttributionResult` (``evaluations = B * M * steps``; ``gap`` is each IG's
        quadrature gap averaged over the coalition baselines).
    """
    if int(coalitions) != coalitions or coalitions < 1:
        raise ValueError(f"coalitions must be a positive integer, got {coalitions}")
    if rule == "adaptive":
        raise ValueError("SIG uses a fixed rule; 'adaptive' is available for IG")
    check_max_regions(max_regions, rule)
    if rule != "exact":  # (checked before the draws take a seed from the global RNG)
        alphas, weights = quadrature.nodes_and_weights(rule, steps)
    with backends.selected(backend):
        problem = make_problem(model, inputs, reference, target, additional_forward_args,
                               defer_row_check=True)
        if problem.K != 1:
            raise ValueError("SIG takes one reference per input, not several baselines")
        groups = feature_groups(feature_mask, problem.inputs)
        n = int(groups.max()) + 1
        gen = seeded_generator(seed)
        present = sample_coalitions(problem.B, n, coalitions, gen).to(problem.x.device)
        ref = problem.baselines.expand(problem.B, 1, -1)

        def build(m0: int, m1: int) -> torch.Tensor:  # b_S: the input on S, the reference off S
            keep = present[:, m0:m1, groups]                               # [B, m, D]
            return torch.where(keep, problem.x.unsqueeze(1), ref).contiguous()

        kw = dict(max_memory=max_memory, chunk_size=chunk_size, progress=progress)
        if rule == "exact":
            from taylor_kernels.attr.exact_ig import exact_integral

            def run(fx, fb, m0, m1):
                return exact_integral(problem, fx, fb, max_regions=max_regions, **kw)
        else:
            def run(fx, fb, m0, m1):
                res = path_engine.integrate(problem, alphas, [weights], **kw)
                return res.sums[0], res.evaluations, None, None
        flat, evaluations, used, regions, fx, fb = reference_groups.integrate_groups(
            problem, int(coalitions), build, run, max_memory,
            endpoints=gap or rule == "exact")
    return AttributionResult(problem.unflatten(flat), reference_groups.mean_gap(flat, fx, fb),
                             evaluations, used, regions)
