"""pytest plugin of bench/gpu_check.sh: keep only the GPU-marked tests, record their outcomes.

A test is GPU-marked when it carries a ``skipif`` mark whose reason names CUDA or a GPU (as
``tests.conftest.requires_cuda`` does). Outcomes go to the JSON file ``$TK_GPU_TESTS_JSON``:
``{"selected": n, "outcomes": {nodeid: "passed" | "failed" | "skipped"}}``.
Use: ``PYTHONPATH=bench pytest -p gpu_marked tests/...``.
"""
from __future__ import annotations

import json
import os
import re

_GPU = re.compile(r"cuda|gpu", re.IGNORECASE)
_outcomes: dict[str, str] = {}
_selected = [0]


def gpu_marked(item) -> bool:
    """Whether ``item`` has a skipif mark whose reason mentions CUDA or a GPU."""
    return any(_GPU.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if gpu_marked(i)]
    drop = [i for i in items if not gpu_marked(i)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    _selected[0] = len(keep)


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        if _outcomes.get(report.nodeid) != "failed":
            _outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session):
    path = os.environ.get("TK_GPU_TESTS_JSON")
    if path:
        with open(path, "w") as f:
            # under pytest-xdist the controller collects nothing: count the reports instead
            json.dump({"selected": _selected[0] or len(_outcomes), "outcomes": _outcomes}, f,
                      indent=1)
