"""Smoke tests: the paper-reproduction scripts in python/ run end to end at small size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: int = 120) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "python" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sig_small_games(tmp_path):
    out = tmp_path / "sig.json"
    text = run_script("sig_small_games.py", "--small", "--out", str(out))
    assert "mean" in text
    res = json.loads(out.read_text())
    assert len(res["games"]) == 4
    for key in ("sig_error", "ig_error", "eg_error"):
        assert 0 <= res["mean"][key] <= 2
