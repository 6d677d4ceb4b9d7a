"""``bench/gpu_check.sh --dry-run``: the prepared GPU check runs end to end on the CPU (tiny
sizes; GPU-only steps skipped and saying so), so the script cannot rot between GPU runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["wheels", "build", "ops", "gpu_tests", "ig_cnn", "ig_gpt2", "graphs", "memcheck", "jet",
         "hessian"]


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out",
                           str(tmp_path), "--budget", "40"], cwd=ROOT, text=True,
                          capture_output=True, timeout=90,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [json_path] = tmp_path.glob("gpu-cpu-dryrun-*.json")
    assert json_path.with_suffix(".txt").is_file()
    data = json.loads(json_path.read_text())
    assert data["dry_run"] and [s["step"] for s in data["steps"]] == STEPS
    by_step = {s["step"]: s for s in data["steps"]}
    for name in ("build", "memcheck"):  # need a GPU: skipped, with the reason
        assert by_step[name]["status"] == "skipped" and by_step[name]["note"]
    for s in data["steps"]:  # ran cleanly, or the budget (a loaded machine) cut it short
        assert s["status"] == "passed" or s["status"].startswith("stopped (budget") or \
            (s["status"] == "skipped" and s["note"]), s
    if by_step["gpu_tests"]["status"] == "passed":
        assert data["gpu_tests"]["selected"] > 0
    if by_step["ops"]["status"] == "passed":
        assert set(data["ops"]["ops"]) == {"path_points", "path_accumulate", "ih_accumulate",
                                          "jet_unary", "jet_mul", "polarize_contract"}
        assert all(e["tests"] and all(v == "passed" for v in e["tests"].values())
                   for e in data["ops"]["ops"].values())
    table = json.loads((tmp_path / "backend_table.json").read_text())
    assert table["schema"] == 1  # a dry run adds no device to the table


def test_gpu_graphs_dry_run(tmp_path):
    """Step ``graphs`` alone (the dry run's budget may skip it on a slow machine)."""
    out = tmp_path / "graphs.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_graphs.py"), "--dry-run",
                           "--rounds", "1", "--out", str(out)], cwd=ROOT, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["cnn ig", "gpt2 token"]
    assert all(r["rel_diff"] == 0 and r["eager_s"] > 0 for r in rows)  # CPU: same loop twice


def _load_gpu_check():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rerun_without_the_ops_step_still_takes_failed_tests_off_the_table(tmp_path,
                                                                             monkeypatch):
    from taylor_kernels import backend_table as bt
    gpu_check = _load_gpu_check()
    table = {"schema": 1, "devices": {"NVIDIA H200": {"ops": {
        "jet_unary": {"choice": "cuda", "ms": {"cuda": 0.2, "triton": 0.3},
                      "tests": {"cuda": "passed", "triton": "passed"}}}}}}
    monkeypatch.setattr(bt, "DEFAULT_PATH", tmp_path / "table.json")
    (tmp_path / "table.json").write_text(json.dumps(table))
    assert gpu_check.ops_from_table("Other GPU") is None
    ops = gpu_check.ops_from_table("NVIDIA H200")
    gpu_check.apply_test_failures(ops, ["tests/ops/test_triton_ops.py::test_jet_unary_triton"])
    assert ops["ops"]["jet_unary"]["choice"] == "cuda"
    assert ops["ops"]["jet_unary"]["tests"]["triton"] == "failed (GPU test)"
    gpu_check.apply_test_failures(ops, ["tests/ops/test_native_ops.py::test_cuda_jet_unary"])
    assert ops["ops"]["jet_unary"]["choice"] == "reference"


def test_a_driver_error_costs_one_step_not_the_results(tmp_path, monkeypatch):
    """A bug in the driver itself (the first device call lost every figure to one) is recorded
    as that step's failure; the later steps run and the result files are still written."""
    gpu_check = _load_gpu_check()

    def broken(c):
        raise ModuleNotFoundError("No module named 'taylor_kernels.backend_table'")

    monkeypatch.setattr(gpu_check, "ops_step", broken)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--steps", "ops,memcheck",
                           "--budget", "30"]) == 0
    [json_path] = tmp_path.glob("gpu-cpu-dryrun-*.json")
    data = json.loads(json_path.read_text())
    by_step = {s["step"]: s for s in data["steps"]}
    assert by_step["ops"]["status"] == "failed (driver)"
    assert "taylor_kernels.backend_table" in by_step["ops"]["note"]
    assert by_step["memcheck"]["status"] == "skipped" and data["finished"]
    assert by_step["wheels"]["status"] != "skipped" or "not selected" not in \
        by_step["wheels"]["note"]  # --steps never leaves out the wheels the others need
    assert json_path.name.endswith("-rerun.json")  # a rerun keeps the full run's files
    assert "failed (driver)" in (tmp_path / "steps.log").read_text()
    assert "failed (driver)" in json_path.with_suffix(".txt").read_text()
