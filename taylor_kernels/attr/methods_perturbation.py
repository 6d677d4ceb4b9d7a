"""Perturbation methods: Occlusion-1, Occlusion-patch, Prediction Difference, Shapley value.

With ``f`` the selected output, ``x`` the input and ``b`` the baseline (``[B, D]`` flattened):

* Occlusion-1: ``a_i = f(x) - f(x with x_i := b_i)``.
* Occlusion-patch (sliding windows, stride 1): ``a_i = mean_{W contains i} f(x) - f(x_W := b_W)``;
  windows are ``p x p`` spatial squares over all channels for ``[C, H, W]`` inputs, runs of
  ``p`` consecutive features otherwise.
* Prediction Difference (marginal reading): ``a_i = f(x) - mean_r f(x with x_i := r_i)`` over
  the rows ``r`` of a background set (univariate marginalisation of feature i).
* Shapley value with absent features at ``b``:
  ``phi_i = sum_{S not containing i} |S|! (D-|S|-1)! / D! (v(S + i) - v(S))``,
  ``v(S) = f(x_S, b_rest)``: exact enumeration for ``D <= 12``, otherwise the mean marginal
  contribution over ``permutations`` random orders.
"""
from __future__ import annotations

import math

import torch

from taylor_kernels.attr.integrated_gradients import AttributionResult
from taylor_kernels.attr.methods_common import (built_values, check_background, prepare, result,
                                                values)
from taylor_kernels.numerics import seeded_generator

EXACT_SHAPLEY_MAX_D = 12


def occlusion(model, inputs, baselines=None, target=None) -> AttributionResult:
    """Occlusion-1: ``a_i = f(x) - f(x with feature i set to its baseline)``; ``[B, ...]``."""
    problem, b = prepare(model, inputs, baselines, target)
    x = problem.x
    B, D = x.shape

    def build(k: torch.Tensor) -> torch.Tensor:  # point 0: x; point p: x with x_{p-1} := b
        r, p = k // (D + 1), k % (D + 1)
        pts, hit = x[r], p > 0
        pts[hit, p[hit] - 1] = b[r[hit], p[hit] - 1]
        return pts

    v = built_values(problem, B, D + 1, build)
    return result(problem, v[:, :1] - v[:, 1:], b, v.numel())


def window_error(feature_shape: tuple[int, ...], window: int) -> str | None:
    """Why sliding windows of size ``window`` do not fit features ``[C, H, W]`` (an image) or
    of any other shape (flattened), else None."""
    if len(feature_shape) == 3 and window > min(feature_shape[1:]):
        return f"window {window} larger than the image {feature_shape[1]}x{feature_shape[2]}"
    if len(feature_shape) != 3 and window > math.prod(feature_shape):
        return f"window {window} larger than the {math.prod(feature_shape)} features"
    return None


def _window_masks(feature_shape: tuple[int, ...], window: int, device) -> torch.Tensor:
    """Bool ``[P, D]``: the sliding windows (stride 1) as masks over flattened features."""
    why = window_error(feature_shape, window)
    if why:
        raise ValueError(why)
    if len(feature_shape) == 3:
        C, H, W = feature_shape
        masks = []
        for r in range(H - window + 1):
            for c in range(W - window + 1):
                m = torch.zeros(C, H, W, dtype=torch.bool, device=device)
                m[:, r:r + window, c:c + window] = True
                masks.append(m.reshape(-1))
        return torch.stack(masks)
    D = math.prod(feature_shape)
    idx = torch.arange(D, device=device)
    starts = torch.arange(D - window + 1, device=device)
    return (idx >= starts[:, None]) & (idx < starts[:, None] + window)


def occlusion_patch(model, inputs, baselines=None, target=None, *,
                    window: int = 2) -> AttributionResult:
    """Occlusion-patch: each feature gets the mean output drop over the sliding windows
    (stride 1, size ``window``) that cover it; ``[B, ...]``."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    problem, b = prepare(model, inputs, baselines, target)
    x = problem.x
    masks = _window_masks(tuple(inputs.shape[1:]), window, x.device)       # [P, D]
    P = masks.shape[0] + 1

    def build(k: torch.Tensor) -> torch.Tensor:  # point 0: x; point p: window p-1 at b
        r, p = k // P, k % P
        win = masks[(p - 1).clamp_min(0)] & (p > 0).unsqueeze(1)
        return torch.where(win, b[r], x[r])

    v = built_values(problem, x.shape[0], P, build)
    drops = v[:, :1] - v[:, 1:]                                             # [B, P]
    m = masks.to(x.dtype)
    attr = drops @ m / m.sum(0).clamp_min(1)
    return result(problem, attr, b, v.numel())


def prediction_difference(model, inputs, background, baselines=None,
                          target=None) -> AttributionResult:
    """Prediction Difference: ``a_i = f(x) - mean_r f(x with x_i := r_i)``, ``r`` over the rows
    of ``background [R, ...]``; the gap is against ``baselines`` (default zeros)."""
    problem, b = prepare(model, inputs, baselines, target)
    x = problem.x
    B, D = x.shape
    bg = check_background(background, inputs).to(x).reshape(background.shape[0], D)                   # [R, D]
    R = bg.shape[0]

    def build(k: torch.Tensor) -> torch.Tensor:  # point 0: x; point 1 + i R + j: x_i := r_ji
        r, p = k // (1 + D * R), k % (1 + D * R)
        pts, hit = x[r], p > 0
        i, j = (p[hit] - 1) // R, (p[hit] - 1) % R
        pts[hit, i] = bg[j, i]
        return pts

    v = built_values(problem, B, 1 + D * R, build)
    attr = v[:, :1] - v[:, 1:].reshape(B, D, R).mean(2)
    return result(problem, attr, b, v.numel())


def _exact_shapley(problem, x: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Exact Shapley values ``[B, D]`` by enumerating the ``2^D`` coalitions."""
    B, D = x.shape
    codes = torch.arange(2 ** D, device=x.device)
    bits = (codes[:, None] >> torch.arange(D, device=x.device)) & 1          # [2^D, D]
    v = values(problem, torch.where(bits.bool(), x[:, None], b[:, None]))     # [B, 2^D]
    size = bits.sum(1)
    fact = [math.factorial(k) for k in range(D + 1)]
    w = torch.tensor([fact[k] * fact[D - k - 1] / fact[D] if k < D else 0.0
                      for k in range(D + 1)], dtype=x.dtype, device=x.device)[size]
    phi = torch.zeros(B, D, dtype=x.dtype, device=x.device)
    for i in range(D):
        without = codes[bits[:, i] == 0]
        phi[:, i] = ((v[:, without | (1 << i)] - v[:, without]) * w[without]).sum(1)
    return phi, v.numel()


def _sampled_shapley(problem, x, b, permutations: int, seed) -> tuple[torch.Tensor, int]:
    """Mean marginal contributions ``[B, D]`` over random feature orders (one set of orders
    shared by all inputs)."""
    B, D = x.shape
    gen = seeded_generator(seed, default=0)
    phi = torch.zeros(B, D, dtype=x.dtype, device=x.device)
    for _ in range(permutations):
        order = torch.randperm(D, generator=gen).to(x.device)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(D, device=x.device)
        present = rank[None, :] < torch.arange(D + 1, device=x.device)[:, None]   # [D+1, D]
        v = values(problem, torch.where(present, x[:, None], b[:, None]))          # [B, D+1]
        phi[:, order] += v[:, 1:] - v[:, :-1]
    return phi / permutations, permutations * (D + 1) * B


def shapley_value(model, inputs, baselines=None, target=None, *, permutations: int = 64,
                  seed: int | None = None) -> AttributionResult:
    """Shapley values of ``v(S) = f(x on S, b elsewhere)``: exact for ``D <= 12``, otherwise
    ``permutations`` sampled orders (seeded); ``[B, ...]``."""
    if not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations must be a positive integer, got {permutations!r}")
    problem, b = prepare(model, inputs, baselines, target)
    if problem.x.shape[1] <= EXACT_SHAPLEY_MAX_D:
        phi, evals = _exact_shapley(problem, problem.x, b)
    else:
        phi, evals = _sampled_shapley(problem, problem.x, b, permutations, seed)
    return result(problem, phi, b, evals)
