"""pytest-benchmark: batched Hessians (``tk.hessian`` vs ``torch.autograd.functional.hessian``
per sample, ``torch.func`` vmapped, layer-by-layer) and Integrated Hessians vs path_explain
(family ``hessian``; errors against float64 references are in the runner's table)."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk
from taylor_kernels.benchmarks import cases_hessian, models

METHODS = ["tk.hessian", "autograd.functional (per sample)", "torch.func vmap(hessian)",
           "layer-by-layer (Linear/Tanh)"]


def _case(tier: str, which: int, seed: int, batch_pos: int):
    """The tier's ``which``-th case, its model and a seeded batch (skips if absent)."""
    cases = cases_hessian.CASES[tier]
    if which >= len(cases):
        pytest.skip("tier has fewer cases")
    case = cases[which]
    D, B = case[0], case[batch_pos]
    model = cases_hessian.build_mlp(D, "cpu")
    x, _ = models.batch({"model": "mlp", "d_in": D, "classes": 1}, B, "cpu", seed=seed)
    return case, model, x


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", [0, 1])
def test_batched_hessian(benchmark, tier, device, which, method):
    (D, B, _, _, _, repeats), model, x = _case(tier, which, 1, 1)
    model, x = model.to(device), x.to(device)
    fn = cases_hessian._hessian_methods(model, x)[method]
    benchmark.group = f"hessian:D{D}"
    benchmark.extra_info.update({"D": D, "B": B})
    benchmark.pedantic(fn, rounds=repeats, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("method", ["ours", "path_explain"])
@pytest.mark.parametrize("which", [0, 1])
def test_integrated_hessians(benchmark, tier, device, which, method):
    (D, _, B, pe_samples, steps_list, repeats), model, x = _case(tier, which, 3, 2)
    model, x = model.to(device), x.to(device)
    if method == "ours":
        def fn():
            return tk.integrated_hessians(model, x, steps=steps_list[-1]).interactions
    else:
        cls = cases_hessian.load_path_explain()
        if cls is None:
            pytest.skip("path-explain not installed (pip install --no-deps path-explain)")
        explainer, base = cls(model), torch.zeros(1, D, device=device)

        def fn():
            return explainer.interactions(x.clone().requires_grad_(True), base,
                                          num_samples=pe_samples[-1], use_expectation=False,
                                          verbose=False)
    benchmark.group = f"integrated_hessians:D{D}"
    benchmark.extra_info.update({"D": D, "B": B})
    benchmark.pedantic(fn, rounds=min(2, repeats), warmup_rounds=0, iterations=1)
