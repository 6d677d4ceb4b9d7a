"""The command line rejects bad command lines with one line on stderr and exit code 2, before
any work starts: unknown flags, bad ``--device`` values, an unwritable ``bench --out``."""
from __future__ import annotations

import subprocess
import sys

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
