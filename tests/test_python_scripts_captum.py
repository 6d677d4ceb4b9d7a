"""Smoke test: python/captum_migration.py runs end to end at small size and agrees with Captum."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_captum_migration_small(tmp_path):
    out = tmp_path / "migration.json"
    proc = subprocess.run([sys.executable, str(ROOT / "python" / "captum_migration.py"),
                           "--small", "--out", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IntegratedGradients" in proc.stdout and "max |diff|" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"IntegratedGradients", "LayerIntegratedGradients",
                                           "LayerConductance", "InternalInfluence",
                                           "NeuronIntegratedGradients",
                                           "NoiseTunnel(IG) smoothgrad", "GradientShap"}
    for r in rows:  # float32: same numbers up to rounding
        assert r["max_abs_diff"] <= 1e-5 * max(r["max_abs_captum"], 1e-12), r
        assert r["captum_s"] > 0 and r["ours_s"] > 0
