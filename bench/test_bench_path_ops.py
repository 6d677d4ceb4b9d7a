"""pytest-benchmark: fused path ops per backend vs the eager PyTorch sequence (family
``path_ops`` of the runner; same cases, same eager code, same byte counts)."""
from __future__ import annotations

import functools

import pytest
import torch

import taylor_kernels as tk
from taylor_kernels.benchmarks import cases_path_ops as po

VARIANTS = ["eager"] + list(tk.backends.NAMES)


@functools.lru_cache(maxsize=1)
def _inputs(case: po.PathCase, device: torch.device) -> dict:
    return po.make_inputs(case, device)


def _rounds(tier: str) -> int:
    return po.REPEATS[tier]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("op", po.OPS)
def test_path_op(benchmark, path_case, op, variant, tier, device):
    if variant != "eager" and variant not in po.backends_for(device):
        pytest.skip(f"backend {variant} does not run natively on {device.type} here")
    inp = _inputs(path_case, device)
    fn = po.op_fn(op, variant, inp, path_case.count)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run():
        fn()
        sync()

    benchmark.group = f"{path_case.name}:{op}"
    nbytes = po.op_bytes(path_case, op)
    benchmark.extra_info.update({"bytes": nbytes, "case": path_case.label(),
                                 "device": str(device)})
    with tk.backends.using(variant if variant != "eager" else "auto"):
        benchmark.pedantic(run, rounds=_rounds(tier), warmup_rounds=1, iterations=1)
    benchmark.extra_info["gbps_median"] = nbytes / benchmark.stats.stats.median / 1e9


def test_copy_bandwidth(benchmark, path_case, tier, device):
    """The yardstick: ``torch.empty_like(big).copy_(big)``, bytes = 2 * size."""
    big = _inputs(path_case, device)["grads"]
    benchmark.group = f"{path_case.name}:copy"
    nbytes = 2 * big.numel() * big.element_size()
    benchmark.extra_info["bytes"] = nbytes
    benchmark.pedantic(lambda: torch.empty_like(big).copy_(big), rounds=max(_rounds(tier), 3),
                       warmup_rounds=1, iterations=1)
    benchmark.extra_info["gbps_median"] = nbytes / benchmark.stats.stats.median / 1e9
