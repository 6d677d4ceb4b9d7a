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


def _all_passed():
    return {"ops": {op: {"ms": {"cuda": 1.0, "triton": 2.0},
                         "tests": {"cuda": "passed", "triton": "passed"}, "choice": "cuda",
                         "rows": []}
                    for op in backend_table.OPS}}


def _failed(ops):
    return {(op, n) for op, e in ops["ops"].items() for n, v in e["tests"].items()
            if v != "passed"}


@pytest.mark.parametrize("nodeid", [
    "tests/engine/test_cuda_graphs.py::test_cuda_graph_equals_eager_ig[cnn]",
    "tests/test_state_hygiene.py::test_state_is_kept_on_cuda[integrated_hessians]",
    "tests/engine/test_distributed.py::test_nccl_one_rank_on_gpu",
    "tests/engine/test_path_engine.py::test_cuda_run_keeps_peak_statistic_and_defers_checks",
    "tests/ops/test_native_ops.py::test_cuda_sources_compile",
    "tests/ops/test_compile_wrappers.py::test_wrapper_compiles_fullgraph_cuda[path-reference]"])
def test_a_failure_about_no_op_is_recorded_and_leaves_the_table_alone(nodeid):
    """Tests outside the op files that name no op (and the nvcc compile test, and a test of the
    reference backend) used to send every op to reference; now they only stay in the results."""
    gc = _gpu_check_module()
    ops = _all_passed()
    assert gc.apply_test_failures(ops, [nodeid]) == {nodeid: []}
    assert not _failed(ops) and {e["choice"] for e in ops["ops"].values()} == {"cuda"}


@pytest.mark.parametrize("nodeid, pairs", [
    # test_native_ops: the CUDA path kernels only
    ("tests/ops/test_native_ops.py::test_cuda_matches_reference[perpoint-(3, 2, 5, 7, False)-"
     "torch.bfloat16]", {("path_points", "cuda"), ("path_accumulate", "cuda")}),
    ("tests/ops/test_native_ops.py::test_cuda_empty_chunk_and_device_mismatch",
     {("path_points", "cuda"), ("path_accumulate", "cuda")}),
    # test_triton_ops: the Triton path kernels; its ih test checks both backends
    ("tests/ops/test_triton_ops.py::test_cuda_strided_and_deterministic",
     {("path_points", "triton"), ("path_accumulate", "triton")}),
    ("tests/ops/test_triton_ops.py::test_ih_bad_index_on_gpu_does_not_sync",
     {("ih_accumulate", "cuda"), ("ih_accumulate", "triton")}),
    # test_compile_wrappers: the case parameter names the ops, the backend parameter the backend
    ("tests/ops/test_compile_wrappers.py::test_wrapper_compiles_fullgraph_cuda[jet-triton]",
     {("jet_unary", "triton"), ("jet_mul", "triton")}),
    ("tests/ops/test_compile_wrappers.py::test_wrapper_compiles_fullgraph_cuda[path-cuda]",
     {("path_points", "cuda"), ("path_accumulate", "cuda")}),
    ("tests/ops/test_compile_wrappers.py::test_wrapper_compiles_fullgraph_cuda[polarize-cuda]",
     {("polarize_contract", "cuda")}),
    ("tests/ops/test_compile_wrappers.py::test_wrapper_compiles_fullgraph_cuda[ih-triton]",
     {("ih_accumulate", "triton")}),
    # test_index_arithmetic: the test's name names the ops; both backends run in each test
    ("tests/ops/test_index_arithmetic.py::test_jet_mul_and_polarize_past_2_31",
     {(op, n) for op in ("jet_mul", "polarize_contract") for n in ("cuda", "triton")}),
    ("tests/ops/test_index_arithmetic.py::test_jet_unary_past_2_31[gelu_tanh]",
     {("jet_unary", "cuda"), ("jet_unary", "triton")}),
    ("tests/ops/test_index_arithmetic.py::test_path_ops_past_2_31",
     {(op, n) for op in ("path_points", "path_accumulate") for n in ("cuda", "triton")}),
    ("tests/ops/test_index_arithmetic.py::test_ih_accumulate_past_2_31",
     {("ih_accumulate", "cuda"), ("ih_accumulate", "triton")}),
    # the backend from a whole parameter token, never from "triton"/"cuda" elsewhere in the id
    ("tests/ops/test_jet_ops.py::test_cuda_backends_match_reference[tanh-cuda]",
     {("jet_unary", "cuda"), ("jet_mul", "cuda")}),
    ("tests/ops/test_jet_ops.py::test_cuda_backends_match_reference[gelu_tanh-triton]",
     {("jet_unary", "triton"), ("jet_mul", "triton")}),
    ("tests/ops/test_hessian_ops.py::test_cuda_backends_match_reference[torch.float64-cuda]",
     {("ih_accumulate", "cuda")}),
    ("tests/ops/test_polarize_ops.py::test_cuda_matches_reference[triton]",
     {("polarize_contract", "triton")}),
    ("tests/ops/test_jet_ops.py::test_opcheck_cuda",
     {(op, n) for op in ("jet_unary", "jet_mul") for n in ("cuda", "triton")}),
])
def test_a_failed_gpu_test_takes_only_its_ops_off_its_backend(nodeid, pairs):
    gc = _gpu_check_module()
    assert gc.failed_pairs(nodeid, list(backend_table.OPS)) == pairs
    ops = _all_passed()
    effect = gc.apply_test_failures(ops, [nodeid])
    assert _failed(ops) == pairs
    assert effect == {nodeid: sorted(f"{op}/{n}" for op, n in pairs)}


def test_parse_nodeid_splits_file_name_and_parameter_tokens():
    gc = _gpu_check_module()
    assert gc.parse_nodeid("tests/ops/test_jet_ops.py::test_x[tanh-CUDA]") == (
        "test_jet_ops", "test_x", ["tanh", "cuda"])
    assert gc.parse_nodeid("tests/a/test_b.py::TestC::test_d") == ("test_b", "test_d", [])
    assert gc.parse_nodeid("t.py::test_e[(1, 2)-torch.float32]")[2] == ["(1, 2)", "torch.float32"]


def test_ops_table_columns_stay_aligned_after_a_failed_gpu_test():
    """"failed (GPU test)" is wider than the check column was: every row's figures line up."""
    gc = _gpu_check_module()
    ops = _all_passed()
    for op, e in ops["ops"].items():
        e["rows"] = [{"backend": b, "median_s": 1e-3, "GBps": 100.0, "frac_copy": 0.5,
                      "speedup_vs_eager": 2.0} for b in ("cuda", "triton", "eager")]
    ops["copy"] = {"GBps": 200.0}
    gc.apply_test_failures(ops, ["tests/ops/test_jet_ops.py::test_cuda_backends_match_reference"
                                 "[tanh-cuda]"])
    lines = [ln for ln in gc.ops_table(ops).splitlines()[1:] if "auto uses" not in ln]
    assert any("failed (GPU test)" in ln for ln in lines)
    ms_end = {ln.index("1.000") for ln in lines[1:]}
    assert len(ms_end) == 1 and len({len(ln) for ln in lines}) == 1, "\n".join(lines)
