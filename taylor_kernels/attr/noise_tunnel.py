"""Noise tunnel: SmoothGrad, SmoothGrad-squared and VarGrad over any path method.

``SG(x) = mean_j A(x + e_j)``, ``SG^2(x) = mean_j A(x + e_j)^2``,
``VG(x) = mean_j A(x + e_j)^2 - SG(x)^2``, ``e_j ~ N(0, stdev^2)``. All ``B * nt_samples``
noisy inputs go through ONE call of the method, so the path engine's chunking and memory
budget bound the whole computation (Captum's NoiseTunnel over IG batches them all at once).
"""
from __future__ import annotations

import torch

from taylor_kernels.attr.integrated_gradients import AttributionResult
from taylor_kernels.engine.problem import as_tuple

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def _repeat_rows(value, B: int, n: int):
    """Repeat per-input values (tensors with batch dim B, lists of length B) n times each."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == B and B > 1:
        return value.repeat_interleave(n, dim=0)
    if isinstance(value, list) and len(value) == B:
        return [v for v in value for _ in range(n)]
    if isinstance(value, tuple):
        return tuple(_repeat_rows(v, B, n) for v in value)
    return value


def noise_tunnel(method, model, inputs, *args, nt_type: str = "smoothgrad",
                 nt_samples: int = 5, stdevs=1.0, seed: int | None = None,
                 **kwargs) -> AttributionResult:
    """Average ``method`` (e.g. :func:`integrated_gradients`) over noisy copies of the inputs.

    Args:
        method: attribution function ``method(model, inputs, *args, **kwargs)``.
        nt_type: ``smoothgrad`` | ``smoothgrad_sq`` | ``vargrad``; nt_samples: noisy copies
            per input; stdevs: noise std (one per input tensor, or one for all); seed: seeds
            the noise. Per-input arguments (baselines/reference ``[B, ...]``, target lists and
            tensors, ``additional_forward_args``) are repeated for each copy.
    Returns:
        :class:`AttributionResult` aggregated over copies (``gap`` averaged over copies).
    """
    if nt_type not in NT_TYPES:
        raise ValueError(f"unknown nt_type {nt_type!r}; choose one of {NT_TYPES}")
    if int(nt_samples) != nt_samples or nt_samples < 1:
        raise ValueError(f"nt_samples must be a positive integer, got {nt_samples}")
    tup, was_tuple = as_tuple(inputs)
    stds = stdevs if isinstance(stdevs, (tuple, list)) else (stdevs,) * len(tup)
    if len(stds) != len(tup):
        raise ValueError(f"{len(stds)} stdevs for {len(tup)} inputs")
    B = tup[0].shape[0]
    gen = torch.Generator(device="cpu").manual_seed(
        seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    noisy = tuple(t.detach().repeat_interleave(nt_samples, 0) + float(s) * torch.randn(
        (B * nt_samples,) + tuple(t.shape[1:]), generator=gen, dtype=t.dtype).to(t.device)
        for t, s in zip(tup, stds))
    args = tuple(_repeat_rows(a, B, nt_samples) for a in args)
    kwargs = {k: _repeat_rows(v, B, nt_samples) if k in (
        "baselines", "reference", "target", "additional_forward_args") else v
        for k, v in kwargs.items()}
    res = method(model, noisy if was_tuple else noisy[0], *args, **kwargs)
    attrs = as_tuple(res.attributions)[0]
    out = []
    for a in attrs:
        a = a.reshape(B, nt_samples, *a.shape[1:])
        if nt_type == "smoothgrad":
            out.append(a.mean(1))
        elif nt_type == "smoothgrad_sq":
            out.append(a.pow(2).mean(1))
        else:
            out.append(a.pow(2).mean(1) - a.mean(1).pow(2))
    gap = res.gap.reshape(B, nt_samples).mean(1)
    return AttributionResult(tuple(out) if was_tuple else out[0], gap, res.evaluations)
