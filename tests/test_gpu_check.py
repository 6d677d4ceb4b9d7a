"""``bench/gpu_check.sh --dry-run``: the prepared GPU check runs end to end on the CPU (tiny
sizes; GPU-only steps skipped and saying so), so the script cannot rot between GPU runs."""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
# memcheck last: the budget cuts the last steps, and it gives no target figure
STEPS = ["wheels", "build", "ops", "gpu_tests", "ig_cnn", "ig_gpt2", "graphs", "jet", "hessian",
         "memcheck"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out",
                           str(tmp_path), "--budget", "40"], cwd=ROOT, text=True,
                          capture_output=True, timeout=90,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                               "TK_COMMIT": COMMIT})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [json_path] = tmp_path.glob("gpu-cpu-dryrun-*.json")
    assert json_path.with_suffix(".txt").is_file()
    data = json.loads(json_path.read_text())
    assert data["dry_run"] and [s["step"] for s in data["steps"]] == STEPS
    assert data["machine"]["git_commit"] == COMMIT  # passed in: the device's tree has no .git
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
    monkeypatch.setenv("TK_COMMIT", COMMIT)
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


def _check(gpu_check, tmp_path, monkeypatch, steps=None):
    """A dry-run ``Check`` writing into ``tmp_path`` (the commit passed in: no git call)."""
    monkeypatch.setenv("TK_COMMIT", COMMIT)
    (tmp_path / "parts").mkdir(exist_ok=True)
    return gpu_check.Check(True, tmp_path, 30.0, tmp_path / "parts", steps)


def test_the_file_names_keep_the_start_date(tmp_path, monkeypatch):
    """The date in the result files' names is fixed at the start: a write after midnight goes
    to the same files, not to a second pair."""
    gpu_check = _load_gpu_check()
    c = _check(gpu_check, tmp_path, monkeypatch)
    start = c.info["date"]

    class Tomorrow(datetime.date):
        @classmethod
        def today(cls):
            return datetime.date(2999, 1, 1)

    monkeypatch.setattr(gpu_check.datetime, "date", Tomorrow)
    gpu_check.write_results(c, {"ops": None, "tests": {}, "families": {}}, True, 30.0)
    assert [p.name for p in tmp_path.glob("gpu-*.json")] == [f"gpu-cpu-dryrun-{start}.json"]


def test_git_commit_from_the_environment_else_git_else_unknown(monkeypatch):
    gpu_check = _load_gpu_check()
    monkeypatch.setenv("TK_COMMIT", f" {COMMIT}\n")
    assert gpu_check.git_commit() == COMMIT
    monkeypatch.delenv("TK_COMMIT")

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(gpu_check.subprocess, "run", no_git)
    assert gpu_check.git_commit() == "unknown"
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 128, stdout="", stderr="fatal: not a git repository"))
    assert gpu_check.git_commit() == "unknown"  # a copy of the tree without .git
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout=f"{COMMIT}\n", stderr=""))
    assert gpu_check.git_commit() == COMMIT


def _executable(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def test_compute_sanitizer_is_found_in_any_cuda_toolkit(tmp_path, monkeypatch):
    gpu_check = _load_gpu_check()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # not on PATH
    root = tmp_path / "local"
    assert gpu_check.find_sanitizer(str(root)) is None
    old = _executable(root / "cuda-12.4" / "bin" / "compute-sanitizer")
    assert gpu_check.find_sanitizer(str(root)) == old
    own_folder = _executable(root / "cuda-12.8" / "compute-sanitizer" / "compute-sanitizer")
    assert gpu_check.find_sanitizer(str(root)) == own_folder  # the newer toolkit
    default = _executable(root / "cuda" / "bin" / "compute-sanitizer")
    assert gpu_check.find_sanitizer(str(root)) == default  # the default toolkit's link wins
    on_path = _executable(tmp_path / "empty" / "compute-sanitizer")
    assert gpu_check.find_sanitizer(str(root)) == on_path


@pytest.mark.parametrize("have_timeout", [False, True])
def test_gpu_tests_skip_the_compile_test_and_time_out_tests_when_they_can(
        tmp_path, monkeypatch, have_timeout):
    """The step skips the nvcc compile test (the build step compiled every .cu file) and passes
    ``--timeout 120`` only where pytest-timeout is importable (else pytest rejects the flag)."""
    gpu_check = _load_gpu_check()
    c = _check(gpu_check, tmp_path, monkeypatch)
    calls = []
    monkeypatch.setattr(c, "run", lambda name, cmd, **kw: calls.append((cmd, kw["env"])) or {})
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name, *a: (
        have_timeout or None) if name == "pytest_timeout" else real(name))
    gpu_check.gpu_tests(c)
    [(cmd, env)] = calls
    assert env["TAYLOR_KERNELS_SKIP_CUDA_COMPILE_TEST"] == "1"
    assert ("--timeout" in cmd) == have_timeout
    if have_timeout:
        assert cmd[cmd.index("--timeout") + 1] == "120"


def _load_gpu_marked():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_marked", ROOT / "bench" / "gpu_marked.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_marked_rewrites_its_outcomes_after_every_report(tmp_path, monkeypatch):
    """A gpu_tests step cut off by its limit keeps every outcome reached: the file is complete
    JSON after each report (written through a rename), and an xdist worker never writes it."""
    plugin = _load_gpu_marked()
    out = tmp_path / "gpu_tests.json"
    monkeypatch.setenv("TK_GPU_TESTS_JSON", str(out))
    plugin.pytest_configure(SimpleNamespace())
    report = lambda nodeid, when, outcome: SimpleNamespace(  # noqa: E731
        nodeid=nodeid, when=when, outcome=outcome)
    plugin.pytest_runtest_logreport(report("t.py::a", "call", "passed"))
    assert json.loads(out.read_text()) == {"selected": 1, "outcomes": {"t.py::a": "passed"}}
    plugin.pytest_runtest_logreport(report("t.py::b", "setup", "skipped"))
    plugin.pytest_runtest_logreport(report("t.py::c", "call", "failed"))
    assert json.loads(out.read_text())["outcomes"] == {
        "t.py::a": "passed", "t.py::b": "skipped", "t.py::c": "failed"}
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_tests.json"]  # no temporary left
    out.unlink()
    plugin.pytest_configure(SimpleNamespace(workerinput={"workerid": "gw0"}))
    plugin.pytest_runtest_logreport(report("t.py::d", "call", "passed"))
    plugin.pytest_sessionfinish(None)
    assert not out.exists()  # the controller writes the reports of every worker


def test_gpt2_probe_writes_its_json_after_each_case(tmp_path, monkeypatch):
    """Step ``ig_gpt2`` cut off (here: failing) in its second case keeps the first's rows."""
    gpu_check = _load_gpu_check()
    from taylor_kernels.benchmarks import cases_llm
    for name in ("CASES", "REPEATS", "THREADS"):  # the probe registers its tier in these
        monkeypatch.setattr(cases_llm, name, dict(getattr(cases_llm, name)))

    def run(tier, device):
        [(case, *_)] = cases_llm.CASES[tier]
        if case != "gpt2 next":
            raise TimeoutError("cut off in the second case")
        return {"rows": [{"case": case, "method": "tk_lig"}], "notes": [], "repeats": 1}

    monkeypatch.setattr(cases_llm, "run", run)
    out = tmp_path / "gpt2.json"
    with pytest.raises(TimeoutError):
        gpu_check.gpt2_probe(True, str(out))
    assert [r["case"] for r in json.loads(out.read_text())["rows"]] == ["gpt2 next"]


def _load_gpu_ops():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_ops", ROOT / "bench" / "gpu_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_op_error_costs_its_pair_not_the_ops_step(monkeypatch):
    """One exception in a check (a Triton compile error, an out-of-memory) lost every timing
    and check of the step, and the backend table with them; it is recorded for its (op,
    backend) pair now, and the result is saved after each op."""
    import torch
    gpu_ops = _load_gpu_ops()
    real = gpu_ops.check

    def check(op, name, device, dt, shape):
        if op == "jet_mul":
            raise RuntimeError("triton compile error")
        return real(op, name, device, dt, shape)

    monkeypatch.setattr(gpu_ops, "check", check)
    saved = []
    result = gpu_ops.run(torch.device("cpu"), tiny=True, check_only=True, log=lambda m: None,
                         save=lambda r: saved.append(len(r["ops"])))
    tests = {op: e["tests"] for op, e in result["ops"].items()}
    assert all(s.startswith("failed (error: RuntimeError: triton compile error")
               for s in tests["jet_mul"].values())
    assert all(s == "passed" for op, t in tests.items() if op != "jet_mul" for s in t.values())
    assert result["ops"]["jet_mul"]["choice"] == "reference"
    assert saved == list(range(1, len(result["ops"]) + 1))


def test_captum_found_but_not_importable_is_a_missing_module(tmp_path, monkeypatch):
    """captum.attr imports matplotlib: a found package that does not import is reported."""
    gpu_check = _load_gpu_check()
    c = _check(gpu_check, tmp_path, monkeypatch)
    c.dry = False
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "no-wheels")
    c.py = str(tmp_path / "python")
    (tmp_path / "python").write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named "
                                     "'matplotlib'\" >&2\nexit 1\n")
    (tmp_path / "python").chmod(0o755)
    gpu_check.install_wheels(c)
    assert c.steps[-1]["status"] == "failed"
    assert "captum.attr (ModuleNotFoundError: No module named 'matplotlib')" in \
        c.steps[-1]["note"]


def test_the_hessian_step_without_path_explain_rows_is_incomplete(tmp_path, monkeypatch):
    """It was recorded "passed" with the comparison the issue asks for missing: the family's
    own notes name path_explain, so only its rows can tell (and a failed row does not count)."""
    import torch

    from taylor_kernels.benchmarks import cases_hessian
    gpu_check = _load_gpu_check()
    monkeypatch.setattr(cases_hessian, "load_path_explain", lambda: None)  # not importable
    hessian = cases_hessian.run("smoke", torch.device("cpu"), log=lambda m: None)
    assert any("path_explain" in note for note in hessian["notes"])
    ours = list(hessian["ih_rows"])
    result = {"schema": 1, "families": {"hessian": hessian}}  # what family() reads back
    c = _check(gpu_check, tmp_path, monkeypatch)
    c.dry = False

    def step_with(extra_rows):
        c.record("hessian", "passed")
        hessian["ih_rows"] = ours + extra_rows
        gpu_check.require_rows(c, result, "path_explain", "not importable")
        return c.steps[-1]

    missing = step_with([])
    assert missing["status"] == "incomplete"
    assert missing["note"] == "no path_explain rows: not importable"
    theirs = {**ours[0], "method": "path_explain interactions"}
    assert step_with([theirs])["status"] == "passed"
    failed = step_with([{**theirs, "error": "RuntimeError: out of memory"}])
    assert failed["status"] == "incomplete" and "out of memory" in failed["note"]
