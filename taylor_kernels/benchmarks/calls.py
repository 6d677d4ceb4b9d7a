"""The calls a benchmark subprocess measures: ours and Captum's, for each attribution method.

``build(spec, model, x, target)`` returns a no-argument function that returns the attributions.
``spec["method"]`` names the call; ``spec`` also carries ``steps`` and method options
(``samples``, ``coalitions``, ``seed``, ``ours_kwargs``). Captum equivalents:

* ``ig``: ``IntegratedGradients.attribute(n_steps, method="gausslegendre")``, one batch;
* ``eg``: Captum's ``GradientShap`` with ``stdevs=0`` *is* expected gradients (one random
  background row and one uniform ``t`` per sample), ``n_samples`` per input;
* ``sig``: the same coalition baselines as ours (same seed and sampler), one Captum IG call
  per coalition (a loop of ``M`` calls), averaged;
* ``layer_ig``: ``LayerIntegratedGradients`` on the model's first layer.
"""
from __future__ import annotations

import torch


def _background(x: torch.Tensor, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, *x.shape[1:], generator=g, dtype=torch.float64).to(x)


def _sig_baselines(x: torch.Tensor, coalitions: int, seed: int) -> torch.Tensor:
    """``[B, M, ...]`` coalition baselines (zero reference), drawn as ours draws them."""
    from taylor_kernels.attr.shapley_ig import sample_coalitions
    B, D = x.shape[0], x[0].numel()
    present = sample_coalitions(B, D, coalitions, torch.Generator().manual_seed(seed))
    flat = torch.where(present.to(x.device), x.reshape(B, 1, D), torch.zeros((), device=x.device,
                                                                               dtype=x.dtype))
    return flat.reshape(B, coalitions, *x.shape[1:])


def build(spec: dict, model, x: torch.Tensor, target: torch.Tensor):
    """The measured call for ``spec["method"]`` (``captum_*`` or ``ours_*``)."""
    import taylor_kernels as tk
    steps, kw = spec["steps"], dict(spec.get("ours_kwargs") or {})
    method = spec["method"]
    samples, coalitions, seed = spec.get("samples", 32), spec.get("coalitions", 16), 0
    if method.startswith("captum"):
        import captum.attr as ca
    if method in ("captum", "captum_ig"):
        ig = ca.IntegratedGradients(model)
        return lambda: ig.attribute(x, target=target, n_steps=steps, method="gausslegendre")
    if method in ("ours", "ours_ig"):
        return lambda: tk.integrated_gradients(model, x, target=target, steps=steps,
                                               rule="gausslegendre", **kw).attributions
    if method == "captum_eg":
        gs, bg = ca.GradientShap(model), _background(x)
        return lambda: gs.attribute(x, bg, target=target, n_samples=samples, stdevs=0.0)
    if method == "ours_eg":
        bg = _background(x)
        return lambda: tk.expected_gradients(model, x, bg, target=target, samples=samples,
                                             seed=seed, **kw).attributions
    if method == "captum_sig":
        ig, bls = ca.IntegratedGradients(model), _sig_baselines(x, coalitions, seed)

        def loop():
            return sum(ig.attribute(x, bls[:, m], target=target, n_steps=steps,
                                    method="gausslegendre")
                       for m in range(coalitions)) / coalitions
        return loop
    if method == "ours_sig":
        return lambda: tk.shapley_integrated_gradients(
            model, x, target=target, coalitions=coalitions, seed=seed, steps=steps,
            **kw).attributions
    layer = model[0]
    if method == "captum_layer_ig":
        lig = ca.LayerIntegratedGradients(model, layer)
        return lambda: lig.attribute(x, target=target, n_steps=steps, method="gausslegendre")
    if method == "ours_layer_ig":
        return lambda: tk.layer_integrated_gradients(model, layer, x, target=target, steps=steps,
                                                     **kw).attributions
    raise ValueError(f"unknown benchmark call {method!r}")
