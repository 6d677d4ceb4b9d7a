"""pytest plugin of bench/gpu_check.sh: keep only the GPU-marked tests, record their outcomes.

A test is GPU-marked when it carries a ``skipif`` mark whose reason names CUDA or a GPU (as
``tests.conftest.requires_cuda`` does). Outcomes go to the JSON file ``$TK_GPU_TESTS_JSON``:
``{"selected": n, "outcomes": {nodeid: "passed" | "failed" | "skipped"}}``, rewritten after
the collection and after every test report, so a step cut off by its time limit keeps every
outcome it reached. Use: ``PYTHONPATH=bench pytest -p gpu_marked tests/...``.
"""
from __future__ import annotations

import json
import os
import re

_GPU = re.compile(r"cuda|gpu", re.IGNORECASE)
_outcomes: dict[str, str] = {}
_state = {"selected": 0, "worker": False}


def gpu_marked(item) -> bool:
    """Whether ``item`` has a skipif mark whose reason mentions CUDA or a GPU."""
    return any(_GPU.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif"))


def write_outcomes() -> None:
    """Write the outcomes so far to ``$TK_GPU_TESTS_JSON`` (a temporary file, then a rename: a
    kill mid-write leaves the previous complete file). A pytest-xdist worker writes nothing: the
    controller receives every worker's reports, a worker would overwrite them with its share."""
    path = os.environ.get("TK_GPU_TESTS_JSON")
    if not path or _state["worker"]:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        # under pytest-xdist the controller collects nothing: count the reports instead
        json.dump({"selected": _state["selected"] or len(_outcomes), "outcomes": _outcomes}, f,
                  indent=1)
    os.replace(tmp, path)


def pytest_configure(config):
    _state["worker"] = hasattr(config, "workerinput")  # set by xdist in its workers only


def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if gpu_marked(i)]
    drop = [i for i in items if not gpu_marked(i)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    _state["selected"] = len(keep)
    write_outcomes()


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        if _outcomes.get(report.nodeid) != "failed":
            _outcomes[report.nodeid] = report.outcome
            write_outcomes()


def pytest_sessionfinish(session):
    write_outcomes()
