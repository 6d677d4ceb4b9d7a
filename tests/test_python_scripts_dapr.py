"""Smoke test: python/dapr_two_moons.py runs end to end at small size and writes its outputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.test_python_scripts import ROOT, run_script


def test_dapr_two_moons_small():
    """Without ``--out-dir`` a ``--small`` run writes to a temporary directory: it wrote into
    ``bench/results/dapr`` and replaced the recorded results the README cites."""
    recorded = ROOT / "bench" / "results" / "dapr" / "two_moons.json"
    before = recorded.read_bytes() if recorded.exists() else None
    text = run_script("dapr_two_moons.py", "--small")
    assert (recorded.read_bytes() if recorded.exists() else None) == before
    assert "test acc, DAPr" in text
    tmp_path = Path(text.strip().splitlines()[-1].removeprefix("written to ").split("/two_moons")[0])
    assert tmp_path.parent != ROOT / "bench" / "results"
    res = json.loads((tmp_path / "two_moons.json").read_text())
    (row,) = res["summary"]
    assert row["n_nuisance"] == 20 and row["repeats"] == 1
    for key in ("base_mean", "prior_mean"):
        assert 0.0 <= row[key] <= 1.0
    assert (tmp_path / "two_moons.png").stat().st_size > 1000
    assert (tmp_path / "two_moons.md").read_text().startswith("| nuisance N")
    shutil.rmtree(tmp_path)
