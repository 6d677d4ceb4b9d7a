"""Modified-backward methods on ``nn.Sequential`` nets: DeepLIFT Rescale, DeepSHAP, LRP-epsilon,
LRP-alpha-beta, Deep Taylor.

Supported layers: affine maps (``nn.Linear``, ``nn.Conv2d`` with zero padding), ``nn.AvgPool2d``,
``nn.Flatten``, and elementwise activations (ReLU, LeakyReLU, Tanh, Sigmoid, GELU, SiLU,
Softplus, ELU, Identity, Dropout in eval, :class:`Power`); anything else raises ``TypeError``.
Nested ``nn.Sequential`` blocks are flattened. Each affine layer is ``z = W a + c``.

* DeepLIFT Rescale: multipliers flow back as ``m_a = W^T m_z`` through affine layers and
  ``m_z = m_y (g(z) - g(z0)) / (z - z0)`` through an activation (``g'(z)`` where ``z ~ z0``),
  ``z0`` the reference's activations; ``a_i = m_i (x_i - b_i)``, summing to ``f(x) - f(b)``.
* DeepSHAP: DeepLIFT averaged over the rows of a background set used as references.
* LRP-epsilon: relevance starts as the selected output ``f(x)``; affine layers
  ``R_a = a * W^T (R_z / (z + eps sign z))`` (bias included in z, so it absorbs relevance);
  activations pass relevance through.
* LRP-alpha-beta: ``R_a = alpha * (positive contributions) - beta * (negative ones)`` with
  contributions ``a_j W_kj`` split by sign (bias ignored); default ``alpha = 2, beta = 1``.
* Deep Taylor (Montavon et al. 2017, unbounded inputs): ``w^2`` rule at the first affine layer
  (``R_i = sum_k W_ki^2 / sum_i' W_ki'^2 R_k``), ``z+`` rule (alpha 1, beta 0) above; the
  method is meant for ReLU nets, other activations pass relevance through as in LRP.
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from taylor_kernels.attr.integrated_gradients import AttributionResult
from taylor_kernels.attr.methods_common import check_background, prepare, result
from taylor_kernels.engine.problem import select_target
from taylor_kernels.models.module_kinds import runs_torch_forward


class Power(nn.Module):
    """Elementwise ``z -> z ** k`` over the last dim, ``k`` one int or one int per unit (the
    activation of the monomial / polynomial probe networks)."""

    def __init__(self, k):
        super().__init__()
        ks = [int(k)] if isinstance(k, int) else [int(v) for v in k]
        # runs of equal exponents: (start, stop, exponent)
        self.blocks = [(s, s + len(list(g)), e) for s, e, g in _runs(ks)]
        self.per_unit = not isinstance(k, int)

    def forward(self, z):
        if not self.per_unit:
            return z ** self.blocks[0][2]
        return torch.cat([z[..., s:t] ** e for s, t, e in self.blocks], dim=-1)


def _runs(values: list[int]):
    """``(start, value, items)`` for each run of equal consecutive values."""
    start = 0
    for v, group in itertools.groupby(values):
        items = list(group)
        yield start, v, items
        start += len(items)


ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Softplus,
               nn.ELU, nn.Identity, nn.Dropout, Power)
AFFINE = (nn.Linear, nn.Conv2d, nn.AvgPool2d)


def sequential_layers(model) -> list[nn.Module]:
    """The layers of an ``nn.Sequential`` (nested blocks flattened); ``TypeError`` on anything
    the rules do not cover."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"rule-based methods need an nn.Sequential model, got "
                        f"{type(model).__name__}")
    layers = []
    for m in model:
        layers.extend(sequential_layers(m) if isinstance(m, nn.Sequential) else [m])
    for m in layers:
        if not isinstance(m, ELEMENTWISE + AFFINE + (nn.Flatten,)) or (
                not isinstance(m, Power) and not runs_torch_forward(m)):
            raise TypeError(f"layer {type(m).__name__} has no propagation rule; supported: "
                            "Linear, Conv2d, AvgPool2d, Flatten and elementwise activations "
                            "(torch's own, not a subclass with its own forward)")
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise TypeError("Conv2d layers need padding_mode='zeros' for the rules")
    return layers


def _weighted(layer: nn.Module, weight_map):
    """The affine layer's linear part with its weight replaced by ``weight_map(W)``, no bias."""
    if isinstance(layer, nn.Linear):
        W = weight_map(layer.weight)
        return lambda a: F.linear(a, W)
    if isinstance(layer, nn.Conv2d):
        W = weight_map(layer.weight)
        return lambda a: F.conv2d(a, W, None, layer.stride, layer.padding, layer.dilation,
                                  layer.groups)
    # AvgPool2d: all weights equal and positive, so the map keeps it or zeroes it
    return layer if weight_map(torch.ones(())) > 0 else (lambda a: layer(a) * 0)


def _vjp(fn, a: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
    """``(d fn / d a)^T cot`` at ``a``."""
    with torch.enable_grad():
        a = a.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(a), a, cot)
    return g


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1, den))


def _activations(layers, a: torch.Tensor) -> list[torch.Tensor]:
    acts = [a]
    with torch.no_grad():
        for layer in layers:
            acts.append(layer(acts[-1]))
    return acts


def _output_seed(problem, out: torch.Tensor) -> torch.Tensor:
    """One-hot cotangent of the selected output (``[N, ...]`` like ``out``)."""
    with torch.enable_grad():
        o = out.detach().requires_grad_(True)
        rows = torch.arange(o.shape[0], device=o.device)
        (g,) = torch.autograd.grad(select_target(o, problem.target, rows).sum(), o)
    return g


def _out_of_place(layer: nn.Module) -> nn.Module:
    """``layer``, or for an in-place activation (``nn.ReLU(inplace=True)``) a shallow copy
    computing out of place: the rules evaluate layers on stored activations (``z``) that an
    in-place call would overwrite (and on leaves that require grad, which it refuses)."""
    if not getattr(layer, "inplace", False):
        return layer
    copied = copy.copy(layer)
    copied.inplace = False
    return copied


def _setup(model, inputs, baselines, target):
    layers = [_out_of_place(m) for m in sequential_layers(model)]
    problem, b = prepare(model, inputs, baselines, target)
    shape = (problem.B,) + tuple(inputs.shape[1:])
    return layers, problem, b, problem.x.reshape(shape), shape


def _deeplift_multipliers(layers, problem, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Rescale-rule multipliers ``m`` at the input (``[B, ...]``): ``sum m (x - ref) = f(x) -
    f(ref)`` for the selected output."""
    ax, ar = _activations(layers, x), _activations(layers, ref)
    m = _output_seed(problem, ax[-1])
    for layer, z, z0 in zip(reversed(layers), reversed(ax[:-1]), reversed(ar[:-1])):
        if isinstance(layer, ELEMENTWISE):
            dz = z - z0
            tol = torch.finfo(z.dtype).eps ** 0.5 * (1 + z.abs())
            small = dz.abs() <= tol
            with torch.no_grad():
                secant = (layer(z) - layer(z0)) / torch.where(small, 1, dz)
            m = m * torch.where(small, _vjp(layer, z, torch.ones_like(z)), secant)
        else:
            m = _vjp(layer if isinstance(layer, nn.Flatten) else _weighted(layer, lambda w: w),
                     z, m)
    return m


def deeplift_rescale(model, inputs, baselines=None, target=None) -> AttributionResult:
    """DeepLIFT with the Rescale rule against the baseline; ``[B, ...]``."""
    layers, problem, b, x, shape = _setup(model, inputs, baselines, target)
    m = _deeplift_multipliers(layers, problem, x, b.reshape(shape))
    return result(problem, (m.reshape(problem.B, -1) * (problem.x - b)), b, 2 * problem.B)


def deepshap(model, inputs, background, baselines=None, target=None) -> AttributionResult:
    """DeepSHAP: DeepLIFT Rescale averaged over ``background [R, ...]`` references; the gap is
    against ``baselines`` (default zeros)."""
    layers, problem, b, x, shape = _setup(model, inputs, baselines, target)
    bg = check_background(background, inputs).to(x)
    attr = torch.zeros_like(problem.x)
    for r in bg:
        ref = r.unsqueeze(0).expand(shape)
        m = _deeplift_multipliers(layers, problem, x, ref)
        attr += (m * (x - ref)).reshape(problem.B, -1)
    return result(problem, attr / bg.shape[0], b, 2 * problem.B * bg.shape[0])


def _lrp(layers, problem, x: torch.Tensor, affine_rule) -> torch.Tensor:
    """Relevance at the input: start from the selected output, apply ``affine_rule(layer, a,
    R, index)`` at affine layers, reshape through Flatten, pass through activations."""
    acts = _activations(layers, x)
    R = _output_seed(problem, acts[-1]) * acts[-1]
    first = next((i for i, layer in enumerate(layers) if isinstance(layer, AFFINE)), None)
    if first is None:
        raise ValueError("LRP needs a Linear or Conv layer in the model: its rules redistribute "
                         "relevance at affine layers, and this model has none")
    for i in range(len(layers) - 1, -1, -1):
        layer, a = layers[i], acts[i]
        if isinstance(layer, nn.Flatten):
            R = R.reshape(a.shape)
        elif isinstance(layer, AFFINE):
            R = affine_rule(layer, a, R, i == first)
    return R


def _epsilon_rule(eps: float):
    def rule(layer, a, R, _first):
        with torch.no_grad():
            z = layer(a)
        s = _safe_div(R, z + eps * torch.where(z >= 0, 1.0, -1.0))  # (eps = 0: a dead unit
        # passes no relevance; 0 / 0 was NaN)
        return a * _vjp(_weighted(layer, lambda w: w), a, s)
    return rule


def _alpha_beta_rule(alpha: float, beta: float):
    def rule(layer, a, R, _first):
        pos = _weighted(layer, lambda w: w.clamp(min=0))
        neg = _weighted(layer, lambda w: w.clamp(max=0))
        ap, an = a.clamp(min=0), a.clamp(max=0)
        with torch.no_grad():
            zp, zn = pos(ap) + neg(an), neg(ap) + pos(an)
        sp, sn = _safe_div(R, zp), _safe_div(R, zn)
        out = alpha * (ap * _vjp(pos, ap, sp) + an * _vjp(neg, an, sp))
        if beta:
            out = out - beta * (ap * _vjp(neg, ap, sn) + an * _vjp(pos, an, sn))
        return out
    return rule


def _deep_taylor_rule(layer, a, R, first):
    if not first:
        return _alpha_beta_rule(1.0, 0.0)(layer, a, R, first)
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise TypeError("Deep Taylor's w^2 rule needs a Linear or Conv2d first layer")
    sq = _weighted(layer, lambda w: w * w)
    ones = torch.ones_like(a)
    with torch.no_grad():
        z = sq(ones)
    return _vjp(sq, ones, _safe_div(R, z))


def _relevance_result(model, inputs, baselines, target, rule) -> AttributionResult:
    layers, problem, b, x, _ = _setup(model, inputs, baselines, target)
    R = _lrp(layers, problem, x, rule)
    return result(problem, R.reshape(problem.B, -1), b, problem.B)


def lrp_epsilon(model, inputs, baselines=None, target=None, *,
                epsilon: float = 1e-6) -> AttributionResult:
    """LRP-epsilon relevance of the selected output (implicit root 0; the gap is against the
    baseline); ``[B, ...]``."""
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    return _relevance_result(model, inputs, baselines, target, _epsilon_rule(epsilon))


def lrp_alpha_beta(model, inputs, baselines=None, target=None, *, alpha: float = 2.0,
                   beta: float = 1.0) -> AttributionResult:
    """LRP-alpha-beta (``alpha - beta = 1`` conserves relevance); ``[B, ...]``."""
    if not (alpha >= 0 and beta >= 0 and abs(alpha - beta - 1) < 1e-12):
        raise ValueError(f"need alpha, beta >= 0 with alpha - beta = 1, got {alpha}, {beta}")
    return _relevance_result(model, inputs, baselines, target, _alpha_beta_rule(alpha, beta))


def deep_taylor(model, inputs, baselines=None, target=None) -> AttributionResult:
    """Deep Taylor decomposition (``w^2`` rule at the first layer, ``z+`` above); ``[B, ...]``."""
    return _relevance_result(model, inputs, baselines, target, _deep_taylor_rule)
