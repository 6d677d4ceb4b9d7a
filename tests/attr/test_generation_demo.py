"""The demo's causal-LM section (tiny GPT-2 on 2-digit addition): data, a short training run,
the one-pass answer attribution and its heatmap."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from taylor_kernels.demo import causal_lm  # noqa: E402
from tests.attr.test_low_precision import one_thread  # noqa: E402,F401  (autouse: 1 thread)


def test_addition_problems_are_reversed_sums():
    tok = causal_lm.tokenizer()
    train, test = causal_lm.problems(tok, seed=0, test_fraction=0.1)
    assert train.shape == (9000, 10) and test.shape == (1000, 10)
    words = tok.convert_ids_to_tokens(test[0].tolist())
    a, b = int("".join(words[1:3])), int("".join(words[4:6]))
    assert words[3] == "+" and words[6] == "=" and "".join(words[7:])[::-1] == f"{a + b:03d}"


def test_section_writes_heatmap_and_caches(tmp_path):
    summary = {}
    sec = causal_lm.causal_lm_section(tmp_path, summary, epochs=1, cache_dir=tmp_path / "c",
                                      steps=8)
    png = tmp_path / "causal_lm_addition.png"
    assert sec["figures"] == [png] and png.read_bytes()[:4] == b"\x89PNG"
    res = summary["causal_lm"]
    assert res["cached"] is False and 0.0 <= res["test_accuracy"] <= 1.0
    assert torch.tensor(res["token_attr"]).shape == (3, 7)
    assert all(v == 0 for v in torch.tensor(res["token_attr"])[:, 0])  # <s> is skipped
    again = {}
    causal_lm.causal_lm_section(tmp_path, again, epochs=1, cache_dir=tmp_path / "c", steps=8)
    assert again["causal_lm"]["cached"] is True
    assert again["causal_lm"]["token_attr"] == res["token_attr"]
