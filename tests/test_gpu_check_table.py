"""The measured per-op backend table (``taylor_kernels.backend_table``) and ``auto`` reading it."""
from __future__ import annotations

import json

import pytest
import torch

from taylor_kernels import backend_table, backends


def test_decide_picks_the_faster_passing_backend():
    passed = {"cuda": "passed", "triton": "passed"}
    assert backend_table.decide({"cuda": 1.0, "triton": 0.9}, passed) == "triton"
    assert backend_table.decide({"cuda": 0.5, "triton": 0.9}, passed) == "cuda"
    assert backend_table.decide({"cuda": 0.5, "triton": 0.9},
                                {"cuda": "failed", "triton": "passed"}) == "triton"
    assert backend_table.decide({"cuda": 0.5}, passed) == "cuda"  # triton not timed
    assert backend_table.decide({"cuda": 0.5, "triton": 0.9},
                                {"cuda": "failed", "triton": "skipped"}) == "reference"
    assert backend_table.decide({}, {}) == "reference"


def _table(ops):
    return {"schema": 1, "devices": {"Fake GPU": {"ops": {
        op: {"choice": c, "ms": {}, "tests": {}} for op, c in ops.items()}}}}


def test_validate_rejects_bad_tables():
    backend_table.validate(_table({"jet_mul": "cuda"}))
    for bad in [{}, {"schema": 2, "devices": {}}, _table({"jet_mul": "cpp"}),
                _table({"no_such_op": "cuda"}), {"schema": 1, "devices": {"X": {}}}]:
        with pytest.raises(ValueError, match="backend table"):
            backend_table.validate(bad)


def test_auto_on_cuda_reads_the_table(tmp_path, monkeypatch):
    """Under ``auto`` a CUDA op takes its measured choice when that backend can run; without a
    table (or for an op it lacks) the fixed order cuda, triton, reference applies."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(backend_table, "device_name", lambda device: "Fake GPU")
    monkeypatch.setenv(backend_table.ENV_VAR, str(tmp_path / "absent.json"))
    order = next(n for n in ("cuda", "triton", "reference") if backends.runs_on(n, gpu))
    with backends.using("auto"):
        assert backends.resolve(gpu, "jet_mul") == order
        path = tmp_path / "table.json"
        path.write_text(json.dumps(_table({"jet_mul": "reference", "path_points": "triton"})))
        monkeypatch.setenv(backend_table.ENV_VAR, str(path))
        assert backends.resolve(gpu, "jet_mul") == "reference"
        expect = "triton" if backends.runs_on("triton", gpu) else order
        assert backends.resolve(gpu, "path_points") == expect
        assert backends.resolve(gpu, "jet_unary") == order  # not in the table
        assert backends.resolve(gpu) == order  # no op named
        assert backends.resolve(torch.device("cpu"), "jet_mul") != "reference" or \
            not backends.runs_on("cpp", torch.device("cpu"))  # CPU never reads the table
    with backends.using("reference"):
        assert backends.resolve(gpu, "path_points") == "reference"  # forcing wins


def _gpu_check_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("_gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_failed_gpu_test_moves_the_op_off_its_backend():
    """gpu_check: an op whose GPU test failed on a backend no longer picks that backend, and
    falls back to reference when neither GPU backend is left."""
    gc = _gpu_check_module()
    ops = {"ops": {op: {"ms": {"cuda": 1.0, "triton": 2.0},
                        "tests": {"cuda": "passed", "triton": "passed"}, "choice": "cuda"}
                   for op in backend_table.OPS}}
    gc.apply_test_failures(ops, [
        "tests/ops/test_native_ops.py::test_cuda_matches_reference[jet_mul-float32]",
        "tests/ops/test_triton_ops.py::test_cuda_split_accumulate_bitwise_stable[(1, 1, 4096)]",
        "tests/ops/test_polarize_ops.py::test_gpu_backends[bf16]"])
    choice = {op: e["choice"] for op, e in ops["ops"].items()}
    assert choice["jet_mul"] == "triton"            # cuda failed there
    assert choice["jet_unary"] == "cuda"            # untouched
    assert choice["polarize_contract"] == "reference"  # both GPU backends failed
    assert ops["ops"]["path_accumulate"]["tests"]["triton"].startswith("failed")
    assert choice["path_accumulate"] == "cuda"
