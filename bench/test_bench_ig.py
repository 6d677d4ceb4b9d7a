"""pytest-benchmark: ``tk.integrated_gradients`` vs Captum (family ``ig_vs_captum``: time only;
peak memory needs a fresh process per call, which only the runner does), and the adaptive rule
vs Captum's 50-step default (family ``adaptive_evals``: evaluations go to ``extra_info``)."""
from __future__ import annotations

import copy

import pytest
import torch

import taylor_kernels as tk
from taylor_kernels.benchmarks import cases_adaptive, cases_ig, models


@pytest.mark.parametrize("method", ["captum", "ours"])
def test_ig_vs_captum(benchmark, ig_case, method, tier, device):
    from captum.attr import IntegratedGradients

    name, spec, batch = ig_case
    model = models.build(spec, device)
    x, target = models.batch(spec, batch, device)
    if method == "captum":
        ig = IntegratedGradients(model)

        def run():
            return ig.attribute(x, target=target, n_steps=cases_ig.STEPS,
                                method="gausslegendre")
    else:
        def run():
            return tk.integrated_gradients(model, x, target=target, steps=cases_ig.STEPS,
                                           rule="gausslegendre").attributions
    if device.type == "cuda":
        inner = run

        def run():
            out = inner()
            torch.cuda.synchronize(device)
            return out
    benchmark.group = f"ig_vs_captum:{name}"
    benchmark.extra_info.update({"batch": batch, "steps": cases_ig.STEPS})
    benchmark.pedantic(run, rounds=cases_ig.REPEATS[tier], warmup_rounds=1, iterations=1)


_TRAINED: dict = {}


def _trained(name: str, spec: dict, steps: int, device: torch.device):
    """The float32-trained model of an adaptive case (trained once per session)."""
    key = (name, steps, str(device))
    if key not in _TRAINED:
        model = models.build(spec, device, torch.float32)
        models.train_synthetic(model, spec, steps)
        _TRAINED[key] = model
    return _TRAINED[key]


@pytest.mark.parametrize("method", ["captum_gl50", "ours_adaptive"])
def test_adaptive_vs_captum50(benchmark, adaptive_case, method, device):
    from captum.attr import IntegratedGradients

    name, spec, steps, dtype_name, batch = adaptive_case
    dtype = getattr(torch, dtype_name)
    model = copy.deepcopy(_trained(name, spec, steps, device)).to(dtype)
    x, _ = models.batch(spec, batch, device, dtype, seed=5)
    with torch.no_grad():
        target = model(x).argmax(1)
    if method == "captum_gl50":
        ig = IntegratedGradients(model)
        benchmark.extra_info["evals_per_input"] = cases_adaptive.CAPTUM_STEPS

        def run():
            return ig.attribute(x, target=target, n_steps=cases_adaptive.CAPTUM_STEPS,
                                method="gausslegendre")
    else:
        res = tk.integrated_gradients(model, x, target=target, rule="adaptive",
                                      tol=cases_adaptive.TOL)
        benchmark.extra_info["evals_per_input"] = res.evaluations / batch
        benchmark.extra_info["max_nodes"] = int(res.nodes_per_input.max())

        def run():
            return tk.integrated_gradients(model, x, target=target, rule="adaptive",
                                           tol=cases_adaptive.TOL)
    benchmark.group = f"adaptive:{name}-{dtype_name}"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
