"""Expected gradients (Erion et al.; the attribution used by DAPr) on the path engine.

``EG_i(x) = E_{r ~ background, t ~ U(0,1)} [(x_i - r_i) d_i f(r + t (x - r))]``, estimated with
``samples`` draws per input: one reference and one uniform ``t`` per sample (per-path nodes).
"""
from __future__ import annotations


import functools

import torch

from taylor_kernels import backends
from taylor_kernels.attr.exact_ig import check_no_graph, exact_integral
from taylor_kernels.attr.integrated_gradients import AttributionResult, check_max_regions
from taylor_kernels.engine import path_engine, reference_groups
from taylor_kernels.engine.chunking import call_threads
from taylor_kernels.engine.derivative import flex_runs_eager_on_cpu
from taylor_kernels.engine.problem import as_tuple, make_problem
from taylor_kernels.numerics import check_dense_real, finite_rows, seeded_generator
from taylor_kernels.engine.guards import public_call


def _background_flat(background, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Background set ``[N, D]`` (flattened, concatenated like the inputs; still attached to
    the caller's graph: ``create_graph`` attributions are differentiable in it too); each
    tensor dense and real (:func:`~taylor_kernels.numerics.check_dense_real`)."""
    bg, _ = as_tuple(background) if not isinstance(background, torch.Tensor) else ((background,),
                                                                                    False)
    if len(bg) != len(inputs):
        raise ValueError(f"background has {len(bg)} tensors for {len(inputs)} inputs")
    parts = []
    for i, (r, x) in enumerate(zip(bg, inputs)):
        check_dense_real(r, f"background {i}")  # (before the cast: it dropped an imaginary part)
        if r.dim() != x.dim() or tuple(r.shape[1:]) != tuple(x.shape[1:]) or r.shape[0] < 1:
            raise ValueError(f"background {i} of shape {tuple(r.shape)} must be [N, "
                             f"*{tuple(x.shape[1:])}] with N >= 1")
        parts.append(r.to(device=x.device, dtype=x.dtype).reshape(r.shape[0], -1))
    if len({p.shape[0] for p in parts}) > 1:
        raise ValueError("every background tensor needs the same number of rows")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def draw_references(problem, background, samples: int, seed: int | None):
    """Draw ``M = samples`` references per input uniformly with replacement from
    ``background``. Returns ``(build, gen)``: ``build(m0, m1)`` gives references ``m0..m1-1``
    of every input, ``[B, m1 - m0, D]`` (gathered when asked: the references are built a group
    at a time, :mod:`~taylor_kernels.engine.reference_groups`), and the private generator
    (seeded with ``seed``, else randomly) for the draws that follow (the ``t`` of each
    sample)."""
    if int(samples) != samples or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples}")
    bg = _background_flat(background, problem.inputs)
    gen = seeded_generator(seed)
    idx = torch.randint(0, bg.shape[0], (problem.B, int(samples)), generator=gen)

    def build(m0: int, m1: int) -> torch.Tensor:
        drawn = idx[:, m0:m1]
        refs = bg[drawn.to(bg.device)]
        # the drawn rows are checked, not the whole background: a training loop passes a
        # large one every step (the full check was 30% of a small DAPr step)
        bad = ~finite_rows(refs)                                  # [B, m]
        if bool(bad.any()):
            row = int(drawn[bad.cpu()][0])
            raise ValueError(f"background row {row} contains NaN or Inf values (drawn as a "
                             "reference)")
        return refs
    return build, gen


@public_call
@flex_runs_eager_on_cpu  # (no backward through it on the CPU)
@call_threads()
def expected_gradients(model, inputs, background, target=None, *, samples: int = 100,
                       seed: int | None = None, additional_forward_args=None, max_memory=None,
                       backend: str | None = None, progress: bool = False,
                       chunk_size: int | None = None, create_graph: bool = False,
                       rule: str | None = None, max_regions: int | None = None,
                       gap: bool = True) -> AttributionResult:
    """Expected gradients with ``samples`` (reference, t) draws per input.

    Args:
        model, inputs, target, additional_forward_args: as :func:`integrated_gradients`.
        background: tensor ``[N, ...]`` (tuple for tuple inputs) to draw references from,
            uniformly with replacement.
        samples: draws per input (``M``); seed: seeds a private generator (reproducible).
        create_graph: keep the graph so the attributions can be trained through (DAPr).
        max_memory, chunk_size, backend, progress: as :func:`integrated_gradients`.
        rule: None (one uniform ``t`` per sample) or ``"exact"``: each sampled reference's
            path integrated exactly (piecewise-linear models; see
            :mod:`taylor_kernels.attr.exact_ig`, ``max_regions`` its cap).
        gap: False skips the forwards of the inputs and the ``B M`` references that the gap
            needs (``gap`` NaN; the exact rule runs them anyway), as Captum's GradientShap
            without ``return_convergence_delta`` (1.5-2x Captum's time on small vision
            models with them).
    Returns:
        :class:`AttributionResult`; ``gap [B] = sum(attr) - mean_m (f(x) - f(r_m))`` is the
        Monte-Carlo error of this estimate; ``evaluations = B * M``.
    """
    if rule is not None and rule != "exact":
        raise ValueError(f"expected_gradients rule must be None or 'exact', got {rule!r}")
    check_max_regions(max_regions, rule)
    if rule == "exact":  # (before the draws take a seed from the global RNG)
        check_no_graph(create_graph)
    with backends.selected(backend):
        problem = make_problem(model, inputs, None, target, additional_forward_args,
                               defer_row_check=True)
        build, gen = draw_references(problem, background, samples, seed)
        M = int(samples)
        engine_kw = dict(max_memory=max_memory, chunk_size=chunk_size, progress=progress,
                         create_graph=create_graph)
        if rule == "exact":
            run = functools.partial(_exact_group, problem, max_regions, engine_kw)
        else:
            alphas = torch.rand(problem.B, M, 1, generator=gen, dtype=torch.float64).to(
                problem.x.device)
            run = functools.partial(_uniform_group, problem, alphas, engine_kw)
        flat, evaluations, used, regions, fx, fb = reference_groups.integrate_groups(
            problem, M, build, run, max_memory, endpoints=gap or rule == "exact")
    gaps = reference_groups.mean_gap(flat, fx, fb)
    if rule == "exact":
        return AttributionResult(problem.unflatten(flat), gaps, evaluations, used, regions)
    return AttributionResult(problem.unflatten(flat), gaps, evaluations)


def _uniform_group(problem, alphas: torch.Tensor, engine_kw: dict, fx, fb, m0: int, m1: int):
    """One group of references, one uniform ``t`` per (input, reference): ``alphas [B, M, 1]``."""
    res = path_engine.integrate(problem, alphas[:, m0:m1].contiguous(), [torch.ones(1, dtype=torch.float64)],
                                **engine_kw)
    return res.sums[0], res.evaluations, None, None


def _exact_group(problem, max_regions, engine_kw: dict, fx, fb, m0: int, m1: int):
    """One group of references, each path integrated by the exact rule."""
    return exact_integral(problem, fx, fb, max_regions=max_regions, **engine_kw)
