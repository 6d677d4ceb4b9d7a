"""The fourteen attribution methods as allocations of Taylor terms, scored on three principles.

Deng et al. (TPAMI 2024, "fourteen methods"; PAPERS.md section 1): every method gives feature i
a share ``w_i(kappa)`` of each Taylor term ``T_kappa = a_kappa Delta^kappa`` of
``f(x) - f(b)``. We measure the shares numerically: a method is applied to a *probe* model that
is exactly one term, ``(x - b)^kappa``, at the same ``x`` and ``b``, and
``w_i(kappa) = a_i / Delta^kappa``. Probes are ``nn.Sequential`` power networks (polarization:
``prod_j v_j = 1/(2^(k-1) k!) sum_{eps, eps_1 = 1} (prod eps) (sum_j eps_j v_j)^k``, the ``v_j``
the k factors of ``kappa`` with repeats), so the rule-based methods (DeepLIFT, LRP, Deep
Taylor, DeepSHAP) run on them too; their shares are those of this realization of the term.
Grad-CAM needs a convolution and gets no probe shares.

Principles (departures, 0 = satisfied), with ``S = supp(kappa)``:

* P1 ``|sum_i a_i - (f(x) - f(b))| / |f(x) - f(b)|`` for the method on the model itself;
* P2 over single-feature terms (first order and independent):
  ``sum_t |T_t| sum_i |w_i - [i = owner]| / sum_t |T_t|``;
* P3 over interaction terms: ``sum_t |T_t| (sum_{i not in S} |w_i| + |sum_{i in S} w_i - 1|) /
  sum_t |T_t|``.

P2 and P3 use the model's largest itemized terms (orders up to ``itemize_order`` from mixed
partials at ``b``); the share of term mass they cover is reported with the residual.
Background methods (expected gradients, DeepSHAP, Prediction Difference) draw references from
``background``; by default that is the baseline alone, and they then coincide with IG (sampled
t), DeepLIFT and Occlusion-1.

The method list follows PAPERS.md; the paper itself (arXiv 2303.01506) could not be read here,
so the rule variants are our readings, documented in each method's module: LRP-alpha-beta with
alpha 2, beta 1; Deep Taylor with the w^2 rule at the first layer; SmoothGrad as averaged
Gradient x Input; Prediction Difference as univariate marginalisation over the background.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from taylor_kernels.attr.expected_gradients import expected_gradients
from taylor_kernels.attr.integrated_gradients import AttributionResult, integrated_gradients
from taylor_kernels.attr.methods_common import prepare, result
from taylor_kernels.attr.methods_gradient import grad_cam, gradient_x_input, smoothgrad
from taylor_kernels.attr.methods_perturbation import (occlusion, occlusion_patch,
                                                      prediction_difference, shapley_value,
                                                      window_error)
from taylor_kernels.attr.methods_rules import (Power, deep_taylor, deeplift_rescale, deepshap,
                                               lrp_alpha_beta, lrp_epsilon, sequential_layers)
from taylor_kernels.engine.jet import mixed_partials
from taylor_kernels.engine.problem import _target_rows
from taylor_kernels.progress import progress_bar
from taylor_kernels.engine.guards import public_call

METHOD_NAMES = ("gradient_x_input", "integrated_gradients", "expected_gradients",
                "deeplift_rescale", "lrp_epsilon", "lrp_alpha_beta", "occlusion_1",
                "occlusion_patch", "prediction_difference", "shapley_value", "deepshap",
                "grad_cam", "smoothgrad", "deep_taylor")
RULE_METHODS = ("deeplift_rescale", "lrp_epsilon", "lrp_alpha_beta", "deepshap", "deep_taylor")


@dataclass
class MethodSettings:
    """Knobs shared by the methods (all seeded: results are reproducible)."""

    background: torch.Tensor | None = None   # [R, ...] references; None: the baseline
    ig_steps: int = 32
    eg_samples: int = 64
    smoothgrad_samples: int = 16
    sigma: float = 0.15
    permutations: int = 32
    window: int = 2
    seed: int = 0


def method_settings(settings) -> MethodSettings:
    """``settings`` as :class:`MethodSettings`: None gives the defaults, a dict its fields
    (``TypeError`` naming an unknown one); anything else is a ``TypeError``."""
    if settings is None:
        return MethodSettings()
    if isinstance(settings, dict):
        return MethodSettings(**settings)
    if not isinstance(settings, MethodSettings):
        raise TypeError(f"settings must be a MethodSettings, a dict of its fields or None, "
                        f"got {type(settings).__name__}")
    return settings


def not_applicable(name: str, model, inputs: torch.Tensor, window: int = 2) -> str | None:
    """Why ``name`` cannot run on ``model`` / ``inputs`` (None when it can); ``window``: patch
    occlusion's."""
    if name in RULE_METHODS:
        try:
            sequential_layers(model)
        except TypeError as exc:
            return str(exc)
    if name == "grad_cam":
        if inputs.dim() != 4 or not isinstance(model, nn.Module) or not any(
                isinstance(m, nn.Conv2d) for m in model.modules()):
            return "Grad-CAM needs image inputs [B, C, H, W] and an nn.Conv2d layer"
    if name == "occlusion_patch":
        return window_error(tuple(inputs.shape[1:]), window)
    return None


def run_method(name: str, model, inputs, baselines, target,
               settings: MethodSettings) -> AttributionResult:
    """One of :data:`METHOD_NAMES` on ``(model, inputs)`` against ``baselines``."""
    s = settings
    bg = s.background
    if bg is None and name in BACKGROUND_METHODS:
        _, b = prepare(model, inputs, baselines, target)
        if not bool((b == b[:1]).all()):  # a baseline per row: each row's is its background
            return _row_by_row(name, model, inputs, b.reshape(inputs.shape), target, s)
        bg = b[:1].reshape(1, *inputs.shape[1:])
    calls = {
        "gradient_x_input": lambda: gradient_x_input(model, inputs, baselines, target),
        "integrated_gradients": lambda: integrated_gradients(
            model, inputs, baselines, target, steps=s.ig_steps),
        "expected_gradients": lambda: _eg_with_gap(model, inputs, bg, baselines, target, s),
        "deeplift_rescale": lambda: deeplift_rescale(model, inputs, baselines, target),
        "lrp_epsilon": lambda: lrp_epsilon(model, inputs, baselines, target),
        "lrp_alpha_beta": lambda: lrp_alpha_beta(model, inputs, baselines, target),
        "occlusion_1": lambda: occlusion(model, inputs, baselines, target),
        "occlusion_patch": lambda: occlusion_patch(model, inputs, baselines, target,
                                                   window=s.window),
        "prediction_difference": lambda: prediction_difference(model, inputs, bg, baselines,
                                                               target),
        "shapley_value": lambda: shapley_value(model, inputs, baselines, target,
                                               permutations=s.permutations, seed=s.seed),
        "deepshap": lambda: deepshap(model, inputs, bg, baselines, target),
        "grad_cam": lambda: grad_cam(model, inputs, baselines, target),
        "smoothgrad": lambda: smoothgrad(model, inputs, baselines, target,
                                         samples=s.smoothgrad_samples, sigma=s.sigma,
                                         seed=s.seed),
        "deep_taylor": lambda: deep_taylor(model, inputs, baselines, target),
    }
    if name not in calls:
        raise ValueError(f"unknown method {name!r}; choose from {METHOD_NAMES}")
    return calls[name]()


BACKGROUND_METHODS = ("expected_gradients", "prediction_difference", "deepshap")


def _row_by_row(name: str, model, inputs: torch.Tensor, baselines: torch.Tensor, target,
                s: MethodSettings) -> AttributionResult:
    """A background method without a background, with a different baseline ``[B, ...]`` per
    row: row ``i`` against its own baseline as its background (one shared background took
    row 0's baseline for every row: 40-90% off on the others)."""
    rows = _target_rows(target, inputs.shape[0], inputs.device)  # per row (a tuple is one
    parts = []  # index for every row, a [1] tensor every row's class)
    for i in range(inputs.shape[0]):
        if rows is None:
            row_target = None
        elif isinstance(rows, torch.Tensor):
            row_target = rows[i:i + 1]
        else:
            row_target = [rows[i]]
        parts.append(run_method(name, model, inputs[i:i + 1], baselines[i:i + 1], row_target,
                                s))
    return AttributionResult(torch.cat([p.attributions for p in parts]),
                             torch.cat([p.gap for p in parts]),
                             sum(p.evaluations for p in parts))


def _eg_with_gap(model, inputs, background, baselines, target, s) -> AttributionResult:
    """Expected gradients with the gap taken against ``f(x) - f(b)`` like every other method."""
    res = expected_gradients(model, inputs, background, target, samples=s.eg_samples,
                             seed=s.seed)
    problem, b = prepare(model, inputs, baselines, target)
    return result(problem, res.attributions.reshape(problem.x.shape).to(problem.x.dtype), b,
                  res.evaluations)


@public_call
def fourteen_methods(model, inputs, baselines=None, target=None, *,
                     settings: MethodSettings | None = None, progress: bool = False) -> dict:
    """All fourteen methods on one model and input batch: ``{name: AttributionResult}``, or
    ``{name: str}`` (the reason) where a method does not apply to the model.

    Args:
        model: ``[B, ...] -> [B, C]`` (or ``[B]``); inputs: ``[B, ...]`` (a tensor);
        baselines: None (zeros), a number or a tensor shaped like the batch or one input;
        target: class per row as in :func:`~taylor_kernels.integrated_gradients`;
        settings: :class:`MethodSettings` or a dict of its fields (background, sample
            counts, noise, window, seed);
        progress: a tqdm bar over the methods, the running one in its postfix.
    Returns: ``{name: AttributionResult | str}`` in the order of ``METHOD_NAMES``, each
    attribution shaped like ``inputs``."""
    settings = method_settings(settings)
    out = {}
    with progress_bar(progress, total=len(METHOD_NAMES), desc="fourteen methods",
                      unit="method") as bar:
        for name in METHOD_NAMES:
            bar.set_postfix_str(name)
            why = not_applicable(name, model, inputs, settings.window)
            out[name] = why if why else run_method(name, model, inputs, baselines, target,
                                                   settings)
            bar.update()
    return out


# --------------------------------------------------------------------------- term probes
def polynomial_network(terms, baseline: torch.Tensor) -> nn.Sequential:
    """``x -> sum_m c_m prod_j (x - b)_{kappa_mj}`` for ``terms = [(c_m, kappa_m), ...]``
    (flattened feature indices with repeats) as ``Flatten -> Linear(D, R) -> Power(k per
    unit) -> Linear(R, 1)``, each term by the polarization identity with ``2^(k-1)`` units;
    output ``[N, 1]``."""
    b = baseline.reshape(-1)
    rows, coefs, powers = [], [], []
    for c, kappa in terms:
        k = len(kappa)
        signs = torch.tensor([(1,) + e for e in itertools.product((1, -1), repeat=k - 1)],
                             dtype=b.dtype)                                 # [2^(k-1), k]
        W = torch.zeros(signs.shape[0], b.numel(), dtype=b.dtype)
        for j, i in enumerate(kappa):
            W[:, i] += signs[:, j]
        rows.append(W)
        coefs.append(c * signs.prod(1) / (2 ** (k - 1) * math.factorial(k)))
        powers += [k] * signs.shape[0]
    W = torch.cat(rows)
    # skip_init: the weights are set below, and the global RNG must not move (seeded calls)
    first = nn.utils.skip_init(nn.Linear, b.numel(), W.shape[0], dtype=b.dtype)
    last = nn.utils.skip_init(nn.Linear, W.shape[0], 1, bias=False, dtype=b.dtype)
    with torch.no_grad():
        first.weight.copy_(W)
        first.bias.copy_(-(W @ b))
        last.weight.copy_(torch.cat(coefs).unsqueeze(0))
    return nn.Sequential(nn.Flatten(), first, Power(powers), last).requires_grad_(False)


def monomial_network(kappa: tuple[int, ...], baseline: torch.Tensor) -> nn.Sequential:
    """The single term ``x -> prod_j (x - b)_{kappa_j}`` as a :func:`polynomial_network`."""
    return polynomial_network([(1.0, tuple(kappa))], baseline)


def allocation(name: str, kappa: tuple[int, ...], inputs: torch.Tensor, baselines,
               settings: MethodSettings | None = None) -> torch.Tensor:
    """Method ``name``'s shares ``w_i(kappa)`` ``[D]`` of the term ``Delta^kappa`` at one input
    ``inputs [1, ...]`` (baseline like one input or the batch, or None for zeros)."""
    settings = method_settings(settings)
    if inputs.shape[0] != 1:
        raise ValueError("allocation probes one input at a time: inputs must be [1, ...]")
    b = torch.zeros_like(inputs) if baselines is None else torch.as_tensor(baselines).to(
        inputs).expand_as(inputs)
    if not kappa:
        raise ValueError("kappa must name at least one feature (the term Delta^kappa of the "
                         "empty multiset is the constant f(b), which no method shares)")
    term = float(torch.prod((inputs - b).reshape(-1)[list(kappa)]))
    if term == 0:
        raise ValueError(f"the term Delta^kappa is 0 for kappa={kappa}: shares are undefined")
    probe = monomial_network(tuple(kappa), b)
    res = run_method(name, probe, inputs, b, 0, settings)
    return res.attributions.reshape(-1) / term


@dataclass
class Term:
    """One Taylor term: flat feature indices with repeats (``kappa``) and its value."""

    kappa: tuple[int, ...]
    value: float

    @property
    def support(self) -> frozenset:
        return frozenset(self.kappa)


def itemized_terms(model, inputs, baselines=None, target=None, *, order: int = 3,
                   max_sets: int = 20000) -> tuple[list[Term], int]:
    """Every Taylor term of one input ``[1, ...]`` around ``b`` up to the highest order
    ``<= order`` whose multisets number at most ``max_sets`` (coefficients from mixed partials:
    ``a_kappa = d^kappa f(b) / kappa!``). Returns ``(terms, itemized_order)``."""
    b = torch.zeros_like(inputs) if baselines is None else torch.as_tensor(baselines).to(
        inputs).expand_as(inputs)
    delta = (inputs - b).reshape(-1)
    D = delta.numel()
    terms, top = [], 0
    for k in range(1, order + 1):
        sets = list(itertools.combinations_with_replacement(range(D), k))
        if len(sets) > max_sets:
            break
        with torch.enable_grad():
            d = mixed_partials(model, b, sets, target=target)[0].detach()
        for s, dk in zip(sets, d.tolist()):
            mult = math.prod(math.factorial(s.count(i)) for i in set(s))
            terms.append(Term(s, dk / mult * float(torch.prod(delta[list(s)]))))
        top = k
    return terms, top


def select_terms(terms: list[Term], max_terms: int, rtol: float = 0.0) -> list[Term]:
    """At most ``max_terms`` terms: the ``ceil(max_terms / 2)`` largest single-feature terms
    and the ``floor(max_terms / 2)`` largest interactions (a class with fewer leaves its places
    to the other), each larger than ``rtol`` times the largest ``|T|``: a term at round-off
    level (an additive model's interactions, ``|T|`` 3e-15 in float64, 1e-6 in float32,
    from the polarization of its mixed partials) is no term, and scored interaction shares
    where the model has none."""
    floor = rtol * max((abs(t.value) for t in terms), default=0.0)
    kept = [t for t in terms if abs(t.value) > floor]
    single = sorted((t for t in kept if len(t.support) == 1), key=lambda t: -abs(t.value))
    inter = sorted((t for t in kept if len(t.support) > 1), key=lambda t: -abs(t.value))
    n_single = min(len(single), max(max_terms - len(inter), (max_terms + 1) // 2))
    return single[:n_single] + inter[:max_terms - n_single]


def principle_departures(terms: list[Term], weights: torch.Tensor) -> tuple[float, float]:
    """``(P2, P3)`` departures from shares ``weights [T, D]`` of ``terms`` (NaN when a class of
    terms is empty)."""
    num = {1: 0.0, 2: 0.0}
    den = {1: 0.0, 2: 0.0}
    for t, w in zip(terms, weights):
        members = torch.zeros_like(w, dtype=torch.bool)
        members[list(t.support)] = True
        if len(t.support) == 1:
            dev = float((w - members.to(w.dtype)).abs().sum())
            cls = 1
        else:
            dev = float(w[~members].abs().sum() + (w[members].sum() - 1).abs())
            cls = 2
        num[cls] += abs(t.value) * dev
        den[cls] += abs(t.value)
    return tuple(num[c] / den[c] if den[c] > 0 else float("nan") for c in (1, 2))
