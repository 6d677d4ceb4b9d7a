"""Family ``inseq``: Inseq (a library built on Captum) unchanged, on Captum vs under ``patch()``.

A GPT-2-style ``transformers`` model built from a config (random weights, no hub) with a
word-level tokenizer trained locally on a few sentences generates a few tokens per prompt;
Inseq attributes every generated token with its ``integrated_gradients`` (on the input
embeddings) and ``layer_integrated_gradients`` (on the embedding layer) methods. Each row
times the same ``model.attribute(...)`` call with Captum's classes as they are, and inside
:func:`taylor_kernels.captum.patched` (Captum's classes running on our path engine), and
reports the largest difference of the attributions and convergence deltas.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from taylor_kernels.benchmarks.report import fmt_time, format_table
from taylor_kernels.benchmarks.timing import measure

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song",
         "hello world this is a test", "the quick brown fox jumps over the lazy dog",
         "a small model reads a few words"]
# (Inseq method, its options): Inseq 0.7.1's decoder-only layer IG reads the token ids from its
# additional forward args, so the baseline ids never reach the model and, with the (a(x) - a(b))
# factor, its attributions are exactly zero in Captum as in ours; without the factor they are
# the integrated layer gradients, a comparison that can fail.
METHODS = (("integrated_gradients", {}), ("layer_integrated_gradients", {}),
           ("layer_integrated_gradients", {"multiply_by_inputs": False}))
# tier -> (n_embd, n_layer, prompts, new tokens, n_steps, repeats)
SIZES = {"smoke": (16, 1, ["the cat sat"], 2, 5, 1),
         "quick": (64, 2, ["the cat sat on", "a dog ran"], 4, 50, 3),
         "full": (256, 4, ["the cat sat on", "a dog ran", "the quick brown fox",
                           "hello world"], 8, 50, 5)}


def tiny_gpt2(n_embd: int = 16, n_layer: int = 2, dtype=torch.float32, device="cpu", seed=0):
    """``(model, tokenizer)``: a GPT-2 LM from ``GPT2Config`` (seeded random weights) and a
    ``PreTrainedTokenizerFast`` around a WordLevel tokenizer trained on :data:`TEXTS`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(
        special_tokens=["<unk>", "<bos>", "<eos>"]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>",
                                     eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=hf_tok.vocab_size, n_positions=64, n_embd=n_embd,
                     n_layer=n_layer, n_head=2, bos_token_id=1, eos_token_id=2,
                     pad_token_id=2)
    model = GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()
    return model, hf_tok


def load(model, tokenizer, method: str, **options):
    """Inseq's attribution model for ``method`` (offline: no hub access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import inseq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inseq.load_model(model, method, tokenizer=tokenizer, **options)


def attribute(attr_model, prompts, new_tokens: int, n_steps: int, patch: bool):
    """Inseq's ``attribute`` (greedy generation, deltas on), with Captum patched or not."""
    import taylor_kernels.captum as tkc

    ctx = tkc.patched() if patch else contextlib.nullcontext()
    with ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attr_model.attribute(prompts, n_steps=n_steps, show_progress=False,
                                    return_convergence_delta=True,
                                    generation_args={"max_new_tokens": new_tokens,
                                                     "do_sample": False})


def tensors(out) -> list[torch.Tensor]:
    """Every attribution and delta tensor of an Inseq output (NaN marks padding)."""
    found = []
    for seq in out.sequence_attributions:
        for t in (seq.source_attributions, seq.target_attributions,
                  (seq.step_scores or {}).get("deltas")):
            if t is not None:
                found.append(t)
    return found


def max_difference(a, b) -> tuple[float, float]:
    """``(max |a - b|, max |b|)`` over all tensors, NaN where both are NaN (padding)."""
    diff = scale = 0.0
    for x, y in zip(tensors(a), tensors(b), strict=True):
        if not torch.equal(torch.isnan(x), torch.isnan(y)):
            return float("inf"), 0.0
        ok = ~torch.isnan(y)
        diff = max(diff, (x[ok] - y[ok]).abs().max().item() if ok.any() else 0.0)
        scale = max(scale, y[ok].abs().max().item() if ok.any() else 0.0)
    return diff, scale


def run(tier: str, device: torch.device, log=print) -> dict:
    try:
        import inseq  # noqa: F401
    except ImportError as exc:
        return {"rows": [], "notes": [f"skipped: inseq is not importable ({exc})"]}
    n_embd, n_layer, prompts, new_tokens, n_steps, repeats = SIZES[tier]
    model, tok = tiny_gpt2(n_embd, n_layer, device=device)
    rows = []
    for method, options in METHODS:
        am = load(model, tok, method, **options)
        outs, times = {}, {}
        for patch in (False, True):
            outs[patch] = attribute(am, prompts, new_tokens, n_steps, patch)
            times[patch] = measure(lambda: attribute(am, prompts, new_tokens, n_steps, patch),
                                   warmup=0, repeats=repeats, device=device)
        diff, scale = max_difference(outs[True], outs[False])
        row = {"method": method + "".join(f" {k}={v}" for k, v in options.items()),
               "prompts": len(prompts), "new_tokens": new_tokens,
               "n_steps": n_steps, "n_embd": n_embd, "n_layer": n_layer,
               "captum_median_s": times[False].median, "patched_median_s": times[True].median,
               "captum": times[False].as_dict(), "patched": times[True].as_dict(),
               "speedup": times[False].median / times[True].median,
               "max_abs_diff": diff, "max_rel_diff": diff / scale if scale else diff}
        log(f"[inseq] {row['method']}: captum {fmt_time(row['captum_median_s'])}, patched "
            f"{fmt_time(row['patched_median_s'])}, max rel diff {row['max_rel_diff']:.1e}")
        rows.append(row)
    notes = ["one row = Inseq's model.attribute() on all prompts (generation + one attribution "
             "per generated token), median of the repeats",
             "patched = the same call inside taylor_kernels.captum.patched(); rel diff = max "
             "|patched - captum| / max |captum| over attributions and deltas",
             "Inseq 0.7.1 decoder-only layer IG never feeds the baseline ids to the model: "
             "with the input factor its attributions are 0 in both; the multiply_by_inputs="
             "False row compares the integrated layer gradients"]
    return {"rows": rows, "notes": notes}


def tables(result: dict) -> list[str]:
    cols = [("method", "inseq method", ""), ("prompts", "prompts", "d"),
            ("new_tokens", "tokens", "d"), ("n_steps", "n_steps", "d"),
            ("n_embd", "d_model", "d"), ("captum_median_s", "captum", fmt_time),
            ("patched_median_s", "patched", fmt_time), ("speedup", "captum/patched", ".2f"),
            ("max_rel_diff", "rel diff", ".1e")]
    return [format_table("inseq (GPT-2 from config, local tokenizer): Captum vs patch()",
                         result["rows"], cols, result["notes"])]
