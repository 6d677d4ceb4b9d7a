"""The command line rejects bad command lines with one line on stderr and exit code 2, before
any work starts: unknown flags, bad ``--device`` values, an unwritable ``bench --out``; and the
bench runner's exit status and results file (failed rows, Ctrl-C)."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from taylor_kernels import benchmarks, cli


def _exit_code_and_err(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    return info.value.code, err


@pytest.mark.parametrize("argv", [["info", "--bogus"], ["--bogus", "info"], ["bench", "--bogus"],
                                  ["demo", "--bogus", "1"], ["info", "extra"], []])
def test_unknown_flags_and_missing_command_exit_2_with_one_line(argv, capsys):
    code, err = _exit_code_and_err(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "error:" in err, err
    if argv:
        assert "unrecognized arguments" in err, err


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "meta", "cuda:99", ""])
def test_bad_bench_device_exits_2_before_running(device, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(benchmarks, "FAMILIES", {})  # any benchmark run would be a KeyError
    code, err = _exit_code_and_err(["bench", "--device", device, "--out",
                                    str(tmp_path / "b.json")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--device" in err and repr(device) in err, err


@pytest.mark.parametrize("only", ["nosuchfamily", ","])
def test_bad_bench_families_exit_2_with_one_line(only, capsys, tmp_path):
    code, err = _exit_code_and_err(["bench", "--only", only, "--out",
                                    str(tmp_path / "b.json")], capsys)
    assert code == 2 and err.count("\n") == 1 and "error:" in err, err


def test_demo_out_that_is_a_file_exits_2_before_training(capsys, tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli.main(["demo", "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err, err


def test_info_reports_a_bad_backend_variable_and_every_op(monkeypatch):
    from taylor_kernels import backends
    from taylor_kernels.backend_table import OPS

    data = cli.info()
    assert set(data["ops"]) == set(OPS) and data["ops"]["jet_unary"]["cpu"] in ("cpp",
                                                                               "reference")
    monkeypatch.setitem(backends._default, "name", "bogus")
    assert "invalid" in cli.info()["forced_backend"]


def test_device_arg_accepts_cpu_and_visible_cuda():
    assert cli.device_arg("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert cli.device_arg("cuda:0") == torch.device("cuda:0")


class _MustNotRun:
    """A benchmark family that fails the test if it is run."""

    @staticmethod
    def run(*args, **kwargs):
        raise AssertionError("a benchmark ran although --out is not writable")


@pytest.mark.parametrize("where", ["under_a_file", "is_a_directory"])
def test_bench_out_checked_before_any_benchmark(where, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmarks, "FAMILIES", {"path_ops": _MustNotRun})
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = blocker / "b.json" if where == "under_a_file" else tmp_path
    code, err = _exit_code_and_err(["bench", "--only", "path_ops", "--device", "cpu",
                                    "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--out" in err and "not writable" in err, err
    assert blocker.read_text() == "x"


def test_require_writable_leaves_no_file_and_keeps_existing_ones(tmp_path):
    new = tmp_path / "a" / "b" / "out.json"
    cli.require_writable(new, "prog")
    assert new.parent.is_dir() and not new.exists()
    old = tmp_path / "old.json"
    old.write_text("{}")
    cli.require_writable(old, "prog")
    assert old.read_text() == "{}"


def test_console_entry_point_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "taylor_kernels.cli", "bench", "--device", "gpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc
    lines = [line for line in proc.stderr.splitlines()
             if "compiled extension not available" not in line and line.strip()
             and not line.startswith("  ")]  # an unbuilt extension's warning is allowed
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("taylor-kernels bench: error: argument --device: 'gpu'")


def _family(run):
    """A benchmark family whose ``run`` is ``run`` and whose table is its name."""
    return SimpleNamespace(run=run, tables=lambda result: [f"table {sorted(result)}"])


def _bench(tmp_path, *argv, prog="taylor-kernels bench"):
    return benchmarks.main(["--smoke", "--device", "cpu", "--out", str(tmp_path / "b.json"),
                            *argv], prog=prog)


def test_bench_with_an_invalid_backend_variable_exits_2_with_one_line(capsys, monkeypatch,
                                                                    tmp_path):
    """It ended in a traceback from the machine info; ``info`` reports it, bench stops."""
    from taylor_kernels import backends
    monkeypatch.setattr(benchmarks, "FAMILIES", {"path_ops": _MustNotRun})
    monkeypatch.setitem(backends._default, "name", "bogus")
    code, err = _exit_code_and_err(["bench", "--only", "path_ops", "--device", "cpu", "--out",
                                    str(tmp_path / "b.json")], capsys)
    assert code == 2 and err.count("\n") == 1 and "'bogus'" in err, err
    assert err.startswith("taylor-kernels bench: error:"), err


def test_bench_runs_a_family_named_twice_once(tmp_path, monkeypatch, capsys):
    runs = []
    monkeypatch.setattr(benchmarks, "FAMILIES", {"jet": _family(
        lambda tier, device, log: runs.append(tier) or {"rows": []})})
    assert _bench(tmp_path, "--only", "jet,jet", "--only", "jet") == 0
    assert runs == ["smoke"] and capsys.readouterr().out.count("table ") == 1


def test_bench_errors_name_the_runner_they_came_from(tmp_path, capsys):
    """``python bench/run.py --only nope`` said ``taylor-kernels bench: error``."""
    with pytest.raises(SystemExit) as info:
        _bench(tmp_path, "--only", "nope", prog="python bench/run.py")
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("python bench/run.py: error:"), err


def test_bench_empty_out_is_an_error_not_the_default_path(capsys, monkeypatch):
    """``--out ""`` silently wrote the default file in the repository."""
    monkeypatch.setattr(benchmarks, "FAMILIES", {"path_ops": _MustNotRun})
    code, err = _exit_code_and_err(["bench", "--only", "path_ops", "--device", "cpu", "--out",
                                    ""], capsys)
    assert code == 2 and err.count("\n") == 1 and "--out" in err, err


def test_bench_interrupted_keeps_the_finished_families_and_exits_130(tmp_path, monkeypatch,
                                                                     capsys):
    """Ctrl-C lost every finished family (the JSON was written at the end only)."""
    out = tmp_path / "b.json"

    def interrupted(tier, device, log):
        assert list(json.loads(out.read_text())["families"]) == ["path_ops"]  # written already
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmarks, "FAMILIES", {
        "path_ops": _family(lambda tier, device, log: {"rows": [{"median_s": 1.0}]}),
        "jet": _family(interrupted)})
    assert _bench(tmp_path, "--only", "path_ops,jet") == 130
    data = json.loads(out.read_text())
    assert list(data["families"]) == ["path_ops"] and data["finished"] is False
    err = capsys.readouterr().err
    assert "interrupted" in err and str(out) in err and "Traceback" not in err


@pytest.mark.parametrize("skipped", [False, True])
def test_bench_exits_1_when_a_row_failed(skipped, tmp_path, monkeypatch, capsys):
    """Every comparison row could fail and the runner (and gpu_check's steps) said 0; a case
    skipped for a missing optional package is no failure."""
    row = {"case": "mlp", "method": "captum", "error": "ImportError: no captum"}
    monkeypatch.setattr(benchmarks, "FAMILIES", {"ig_vs_captum": _family(
        lambda tier, device, log: {"rows": [{**row, "skipped": skipped}]})})
    assert _bench(tmp_path, "--only", "ig_vs_captum") == (0 if skipped else 1)
    err = capsys.readouterr().err
    assert ("FAILED ig_vs_captum mlp captum: ImportError: no captum" in err) != skipped, err
    assert json.loads((tmp_path / "b.json").read_text())["finished"] is True
