"""Smoke test: python/dapr_two_moons.py runs end to end at small size and writes its outputs."""
from __future__ import annotations

import json

from tests.test_python_scripts import run_script


def test_dapr_two_moons_small(tmp_path):
    text = run_script("dapr_two_moons.py", "--small", "--out-dir", str(tmp_path))
    assert "test acc, DAPr" in text
    res = json.loads((tmp_path / "two_moons.json").read_text())
    (row,) = res["summary"]
    assert row["n_nuisance"] == 20 and row["repeats"] == 1
    for key in ("base_mean", "prior_mean"):
        assert 0.0 <= row[key] <= 1.0
    assert (tmp_path / "two_moons.png").stat().st_size > 1000
    assert (tmp_path / "two_moons.md").read_text().startswith("| nuisance N")
