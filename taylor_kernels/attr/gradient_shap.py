"""GradientSHAP's sampled one-node paths on the path engine.

Each row ``r`` is one sample: an input ``x_r`` (noised), a baseline ``b_r`` (drawn) and a node
``t_r``; its attribution is ``(x_r - b_r) * grad f(b_r + t_r (x_r - b_r))`` (without the
factor for ``multiply_by_inputs=False``). All rows are one engine pass with per-path nodes
``[R, 1, 1]``, chunked to the memory budget. The caller draws and averages.
"""
from __future__ import annotations

import torch

from taylor_kernels.attr.integrated_gradients import AttributionResult
from taylor_kernels.attr.unscaled import Unscaled
from taylor_kernels.engine import path_engine
from taylor_kernels.engine.derivative import flex_runs_eager_on_cpu
from taylor_kernels.engine.problem import make_problem
from taylor_kernels.numerics import all_finite


@flex_runs_eager_on_cpu  # (no backward through it on the CPU)
def gradient_shap_rows(model, inputs: tuple[torch.Tensor, ...],
                       baselines: tuple[torch.Tensor, ...], alphas: torch.Tensor, target=None,
                       additional_forward_args: tuple = (), *, multiply_by_inputs: bool = True,
                       was_tuple: bool = True, with_gap: bool = False, max_memory=None,
                       chunk_size: int | None = None, progress: bool = False
                       ) -> AttributionResult:
    """Per-row attributions ``[R, ...]`` at one sampled node per row (see the module doc).

    Args: ``inputs``/``baselines`` tuples of ``[R, ...]`` tensors (baselines dense),
    ``alphas [R]``; ``with_gap``: also ``gap [R] = sum(attr_r) - (f(x_r) - f(b_r))`` (else
    NaN). Returns :class:`AttributionResult` (a tuple of tensors when ``was_tuple``).
    """
    x, bl, fargs = inputs, baselines, tuple(additional_forward_args)
    if not multiply_by_inputs:
        for i, t in enumerate(inputs):
            if not all_finite(t):
                raise ValueError(f"input {i} contains NaN or Inf values")
        model = Unscaled(model, len(inputs))
        x, fargs = Unscaled.arguments(inputs, baselines, fargs)
        bl = 0.0
    problem = make_problem(model, x if was_tuple else x[0], bl, target, fargs,
                           defer_row_check=True)  # the path's first batch checks
    nodes = alphas.to(torch.float64).reshape(-1, 1, 1)
    res = path_engine.integrate(problem, nodes, [torch.ones(1, dtype=torch.float64)],
                                max_memory=max_memory, chunk_size=chunk_size, progress=progress)
    flat = res.sums[0]
    gap = torch.full((problem.B,), float("nan"), dtype=flat.dtype, device=flat.device)
    if with_gap:
        fx, fb = path_engine.endpoint_values(problem, max_memory=max_memory)
        gap = flat.sum(dim=1) - (fx - fb.mean(dim=1))
    return AttributionResult(problem.unflatten(flat), gap, res.evaluations)
