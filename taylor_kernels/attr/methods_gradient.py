"""Gradient methods: Gradient x Input, SmoothGrad-style averaging, Grad-CAM.

* Gradient x Input (relative to the baseline): ``a_i = (x_i - b_i) d_i f(x)``; on a Taylor term
  ``Delta^kappa`` it gives feature i the share ``kappa_i`` (a term of order k is counted k times).
* SmoothGrad (averaging reading): Gradient x Input averaged over ``samples`` noisy copies
  ``x + e``, ``e ~ N(0, (sigma * (max x - min x))^2)`` per input, through :func:`noise_tunnel`.
* Grad-CAM: on the last ``nn.Conv2d`` (or ``layer``) output ``A [C', h, w]``,
  ``cam = relu(sum_c alpha_c A_c)`` with ``alpha_c = mean_{hw} d f / d A_c``, upsampled
  (bilinear) to the input's ``H x W`` and shared by every input channel.
"""
from __future__ import annotations

import torch
from torch import nn

from taylor_kernels.attr.integrated_gradients import AttributionResult
from taylor_kernels.attr.methods_common import gradients, prepare, result
from taylor_kernels.attr.noise_tunnel import noise_tunnel
from taylor_kernels.engine.derivative import flex_runs_eager_on_cpu
from taylor_kernels.engine.thread_hooks import this_thread


@flex_runs_eager_on_cpu  # (no backward through it on the CPU)
def gradient_x_input(model, inputs, baselines=None, target=None) -> AttributionResult:
    """``a = (x - b) * grad f(x)``, shaped like ``inputs``."""
    problem, b = prepare(model, inputs, baselines, target)
    _, g = gradients(problem, problem.x)
    return result(problem, (problem.x - b) * g, b, problem.B)


def smoothgrad(model, inputs, baselines=None, target=None, *, samples: int = 16,
               sigma: float = 0.15, seed: int | None = None) -> AttributionResult:
    """Gradient x Input averaged over ``samples`` noisy copies (noise std ``sigma`` times each
    input's value range); the gap is against ``f(x) - f(b)`` at the clean input."""
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    problem, b = prepare(model, inputs, baselines, target)
    x = problem.x
    span = (x.amax(1) - x.amin(1)).clamp_min(1e-12) if x.shape[1] else \
        x.new_ones(x.shape[0])  # [B]: each row's own range (no features: no noise to scale)
    res = noise_tunnel(gradient_x_input, model, inputs, baselines=problem.unflatten(b),
                       target=target, nt_samples=samples, stdevs=sigma * span, seed=seed)
    return result(problem, res.attributions.reshape(x.shape), b, res.evaluations)


def _last_conv(model: nn.Module) -> nn.Conv2d:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("Grad-CAM needs a model with an nn.Conv2d layer (or pass layer=)")
    return convs[-1]


def grad_cam(model: nn.Module, inputs, baselines=None, target=None, *,
             layer: nn.Module | None = None) -> AttributionResult:
    """Grad-CAM on ``layer`` (default: the last ``nn.Conv2d``) for image inputs
    ``[B, C, H, W]``; the map is upsampled to ``H x W`` and repeated over the ``C`` channels."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise ValueError("Grad-CAM takes image inputs [B, C, H, W]")
    layer = layer if layer is not None else _last_conv(model)
    problem, b = prepare(model, inputs, baselines, target)
    store = {}
    def keep(module, inputs, output):  # the model goes on with a copy: an in-place ReLU
        store["a"] = output  # after the layer would otherwise rewrite the stored activation
        return output.clone()

    handle = layer.register_forward_hook(this_thread(keep))
    try:
        with torch.enable_grad():
            # the input needs grad so that the activation has one even when the model is frozen
            out = problem.forward(problem.x.clone().requires_grad_(True),
                                  torch.arange(problem.B, device=problem.x.device))
            act = store["a"]
            (g,) = torch.autograd.grad(out.sum(), act)
    finally:
        handle.remove()
    alpha = g.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((alpha * act).sum(1, keepdim=True)).detach()        # [B, 1, h, w]
    cam = nn.functional.interpolate(cam, size=inputs.shape[2:], mode="bilinear",
                                    align_corners=False)
    attr = cam.expand(-1, inputs.shape[1], -1, -1).reshape(problem.B, -1)
    return result(problem, attr.to(problem.x.dtype), b, problem.B)
