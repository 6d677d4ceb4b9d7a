"""pytest-benchmark suites over the runner's cases: ``pytest bench --bench-tier quick``.

Not part of the test suite (that is ``tests/``). Tiers: smoke, quick (default), full.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taylor_kernels.benchmarks.machine import bench_device  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-tier", default="quick", choices=["smoke", "quick", "full"],
                     help="benchmark sizes (smoke, quick, full); default quick")


@pytest.fixture(scope="session")
def tier(request) -> str:
    return request.config.getoption("--bench-tier")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


def pytest_generate_tests(metafunc):
    """Parametrize ``path_case`` / ``ig_case`` / ``adaptive_case`` by the chosen tier."""
    from taylor_kernels.benchmarks import cases_adaptive, cases_ig, cases_path_ops

    tier = metafunc.config.getoption("--bench-tier")
    if "path_case" in metafunc.fixturenames:
        cases = cases_path_ops.CASES[tier]
        metafunc.parametrize("path_case", cases, ids=[c.name for c in cases])
    if "ig_case" in metafunc.fixturenames:
        cases = cases_ig.CASES[tier]
        metafunc.parametrize("ig_case", cases, ids=[c[0] for c in cases])
    if "adaptive_case" in metafunc.fixturenames:
        cases = [(name, spec, steps, dt, b) for name, spec, steps, dtypes, b
                 in cases_adaptive.CASES[tier] for dt in dtypes]
        metafunc.parametrize("adaptive_case", cases, ids=[f"{c[0]}-{c[3]}" for c in cases])
