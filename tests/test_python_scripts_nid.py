"""Smoke test: python/nid_interactions.py trains, scores and writes its table at tiny size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
import nid_interactions as nid  # noqa: E402


def test_nid_small_run_writes_table(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "python" / "nid_interactions.py"),
                           "--small", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "nid.json").read_text())["rows"]
    assert [r["function"] for r in rows] == ["F1", "F5"]
    for r in rows:
        for key in ("auc_cross", "auc_ih", "auc_nid"):
            assert 0 <= r[key] <= 1
        assert r["positive_pairs"] == (11 if r["function"] == "F1" else 8)
    md = (tmp_path / "nid.md").read_text()
    assert "| F5 |" in md and "AUC NID" in md


def test_functions_labels_and_scores():
    gen = torch.Generator().manual_seed(0)
    for name, (fn, truth) in nid.FUNCTIONS.items():
        x = nid.sample(name, 64, gen)
        assert torch.isfinite(fn(x)).all(), name
        assert sum(nid.labels(truth)) >= 4
    x1 = nid.sample("F1", 256, gen)
    assert x1[:, [3, 4, 7, 9]].min() >= 0.6 and x1.min() >= 0
    perfect = torch.zeros(10, 10)
    for (i, j), lab in zip(nid.PAIRS, nid.labels(nid.FUNCTIONS["F3"][1])):
        perfect[i, j] = lab
    assert nid.auc(perfect, nid.labels(nid.FUNCTIONS["F3"][1])) == 1.0
    assert nid.auc(-perfect, nid.labels(nid.FUNCTIONS["F3"][1])) == 0.0
    # NID score: a unit wired to features 0 and 1 only gives that pair the strength
    model = nid.make_mlp(0)
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.Linear):
                m.weight.fill_(1.0)
        model[0].weight.zero_()
        model[0].weight[0, :2] = torch.tensor([2.0, 3.0])
    s = nid.nid_pairwise(model)
    assert s[0, 1] == 2.0 * 100 * 60 * 20 and s[0, 2] == 0 and s[2, 3] == 0
