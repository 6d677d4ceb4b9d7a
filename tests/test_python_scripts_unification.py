"""Smoke test: python/unification_table.py runs end to end at small size (< 20 s)."""
from __future__ import annotations

import json

from tests.test_python_scripts import run_script


def test_unification_table_small(tmp_path):
    text = run_script("unification_table.py", "--small", "--out", str(tmp_path))
    assert "| integrated_gradients |" in text and "## cnn" in text
    res = json.loads((tmp_path / "unification.json").read_text())
    assert abs(res["polynomial"]["residual"]) < 1e-10      # every Taylor term exact
    for model in ("polynomial", "mlp", "cnn"):
        rows = {r["method"]: r for r in res[model]["rows"]}
        assert len(rows) == 14
        assert rows["shapley_value"]["p1"] < 1e-9          # exact or permutation: complete
        assert rows["deeplift_rescale"]["p1"] < 1e-9
        assert rows["integrated_gradients"]["p2"] < 1e-9
        assert rows["integrated_gradients"]["p3"] < 1e-9
        assert rows["occlusion_1"]["p3"] > 0.5               # over-allocates interactions
        assert (tmp_path / f"unification_{model}.png").exists()
    assert res["cnn"]["rows"][11]["p1"] is not None          # Grad-CAM runs on the CNN
    assert res["mlp"]["rows"][11]["p1"] is None              # and not on the MLP
