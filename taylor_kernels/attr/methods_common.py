"""Shared plumbing of the fourteen-method layer: one flattened problem per call, batched model
evaluations at perturbed points, input gradients, and the result with its completeness gap.

Every method returns an :class:`AttributionResult` whose ``gap [B]`` is
``sum_i a_i - (f(x) - f(b))`` against the baseline ``b`` of the call, so principle P1
(completeness) reads the same for every method.
"""
from __future__ import annotations

import torch

from taylor_kernels.attr.integrated_gradients import AttributionResult
from taylor_kernels.engine.problem import PathProblem, make_problem

EVAL_CHUNK = 4096  # rows per model call when evaluating many perturbed points


def prepare(model, inputs, baselines=None, target=None) -> tuple[PathProblem, torch.Tensor]:
    """Validate a call and return the problem and the flat baseline ``b [B, D]`` (one baseline
    per input; ``inputs`` must be one tensor ``[B, ...]``)."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError("these attribution methods take one input tensor [B, ...]")
    problem = make_problem(model, inputs, baselines, target)
    if problem.K != 1:
        raise ValueError(f"one baseline per input expected, got {problem.K} per input")
    return problem, problem.baselines[:, 0].expand(problem.B, -1).contiguous()


def check_background(background, inputs: torch.Tensor) -> torch.Tensor:
    """``background`` checked to be ``[R >= 1, *features of inputs]`` (an empty one made the
    reference means NaN, silently)."""
    if not isinstance(background, torch.Tensor) or background.shape[1:] != inputs.shape[1:] \
            or background.shape[0] == 0:
        what = tuple(background.shape) if isinstance(background, torch.Tensor) else \
            type(background).__name__
        raise ValueError(f"background must be a tensor [R >= 1, *{tuple(inputs.shape[1:])}], "
                         f"got {what}")
    return background


def values(problem: PathProblem, points: torch.Tensor) -> torch.Tensor:
    """Selected outputs ``[B, P]`` at ``points [B, P, D]`` (row b's points use input b's target),
    without gradients, in chunks of ``EVAL_CHUNK`` rows."""
    B, P, D = points.shape
    flat = points.reshape(B * P, D)
    return built_values(problem, B, P, lambda k: flat[k])


def built_values(problem: PathProblem, B: int, P: int, build) -> torch.Tensor:
    """Selected outputs ``[B, P]`` at points built ``EVAL_CHUNK`` at a time: ``build(k)``
    gives the flat points ``[n, D]`` of indices ``k [n]``, ``k = b * P + p`` (row ``b``'s
    ``p``-th point, read with input ``b``'s target); no gradients. Only one chunk of points
    exists at a time (Prediction Difference's ``[B, D, R, D]`` points were 4.8 GB for a
    3x32x32 image and 64 background rows)."""
    device = problem.x.device
    out = []
    with torch.no_grad():
        for s in range(0, B * P, EVAL_CHUNK):
            k = torch.arange(s, min(s + EVAL_CHUNK, B * P), device=device)
            out.append(problem.forward(build(k), k // P))
    return torch.cat(out).reshape(B, P).to(problem.x.dtype)


def gradients(problem: PathProblem, points: torch.Tensor,
              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f [N], grad f [N, D])`` at flat ``points [N, D]`` (rows default: one per input)."""
    if rows is None:
        rows = torch.arange(points.shape[0], device=points.device)
    with torch.enable_grad():
        p = points.detach().clone().requires_grad_(True)
        out = problem.forward(p, rows)
        (g,) = torch.autograd.grad(out.sum(), p)
    return out.detach(), g.detach()


def result(problem: PathProblem, attr: torch.Tensor, b: torch.Tensor,
           evaluations: int) -> AttributionResult:
    """Wrap flat attributions ``[B, D]``; gap against ``f(x) - f(b)``."""
    ends = values(problem, torch.stack([problem.x, b], dim=1))
    gap = attr.sum(1) - (ends[:, 0] - ends[:, 1])
    return AttributionResult(problem.unflatten(attr), gap, evaluations + 2 * problem.B)
