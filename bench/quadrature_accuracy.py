#!/usr/bin/env python
"""How accurate is 64-node Gauss-Legendre on the ``llm`` family's next-token cases?

Token IG on the random Llama config (``score="log_prob"``, pad baseline, the ``llm`` case's
prompt and target; bf16 and float32) and on MiniLM (the ``llm`` case's sentence similarity,
``[PAD]`` baseline): Gauss-Legendre at 16 to 512 nodes and the adaptive rule (``tol=1e-3``):
completeness gap ``sum(attr) - (f(x) - f(b))``, max relative difference to GL-512,
evaluations, and the time of a second (warm) call. ``--composite`` adds, on MiniLM's
integrand evaluated directly, composite Gauss-Legendre rules with 32 nodes split over
intervals chosen with the integrand's profile in hand (the best a local adaptive rule could
do at half of Captum's 64 nodes, before spending any node on error estimates).
``python bench/quadrature_accuracy.py [--case llama|minilm|all] [--composite]``.
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

import torch  # noqa: E402

import taylor_kernels as tk  # noqa: E402
from taylor_kernels.benchmarks import cases_llm  # noqa: E402
from taylor_kernels.engine import quadrature  # noqa: E402

RULES = {f"gl{n}": dict(steps=n) for n in (16, 32, 48, 64, 128, 512)}
RULES["adaptive"] = dict(rule="adaptive", tol=1e-3)


def llama_calls():
    """``(label, call(**rule))`` for the random Llama config in bf16 and float32."""
    for dtype in ("bfloat16", "float32"):
        model, _ = cases_llm.build(tuple(sorted({**cases_llm.LLAMA, "dtype": dtype}.items())))
        g = torch.Generator().manual_seed(0)  # as cases_llm._next_call
        ids = torch.randint(4, model.config.vocab_size, (1, 22), generator=g)
        target = int(torch.randint(4, model.config.vocab_size, (1,), generator=g))
        yield f"llama {dtype}", lambda model=model, ids=ids, target=target, **kw: \
            tk.token_integrated_gradients(model, ids, target, baselines="pad",
                                          score="log_prob", **kw)


def minilm_calls():
    """``(label, call(**rule))`` for MiniLM's sentence similarity (as cases_llm)."""
    model, tok = cases_llm.build(tuple(sorted(cases_llm.MINILM.items())))
    enc = tok(cases_llm.SENTENCES[0], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        other = cases_llm._pooled(model(**tok(cases_llm.SENTENCES[1], return_tensors="pt")),
                                  None)[0]
    keep = (ids == tok.cls_token_id) | (ids == tok.sep_token_id)
    yield "minilm float32", lambda **kw: tk.token_integrated_gradients(
        model, ids, attention_mask=mask, baselines="pad", keep=keep, position=None,
        output=lambda out: cases_llm._pooled(out, mask) @ other, **kw)


def minilm_integrand():
    """``g(t) [n, L, H]``: MiniLM's IG integrand ``(e_x - e_b) * grad`` at path points ``t
    [n]`` (as ``minilm_calls``: word embeddings, ``[PAD]`` baseline, CLS/SEP kept)."""
    model, tok = cases_llm.build(tuple(sorted(cases_llm.MINILM.items())))
    enc = tok(cases_llm.SENTENCES[0], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    keep = (ids == tok.cls_token_id) | (ids == tok.sep_token_id)
    with torch.no_grad():
        other = cases_llm._pooled(model(**tok(cases_llm.SENTENCES[1], return_tensors="pt")),
                                  None)[0]
        emb = model.get_input_embeddings()
        ex, eb = emb(ids), emb(torch.where(keep, ids, tok.pad_token_id))

    def g(ts: torch.Tensor) -> torch.Tensor:
        parts = []
        for chunk in ts.to(ex.dtype).split(64):
            pts = (eb + chunk[:, None, None] * (ex - eb)).requires_grad_()
            m = mask.expand(len(chunk), -1)
            f = cases_llm._pooled(model(inputs_embeds=pts, attention_mask=m), m) @ other
            parts.append((torch.autograd.grad(f.sum(), pts)[0] * (ex - eb)).double())
        return torch.cat(parts)
    return g


def composite(g, edges, nodes) -> torch.Tensor:
    """Gauss-Legendre with ``nodes[i]`` nodes on ``[edges[i], edges[i + 1]]``, summed."""
    total = 0
    for a, b, n in zip(edges[:-1], edges[1:], nodes):
        t, w = quadrature.nodes_and_weights("gausslegendre", n)
        total = total + (g(a + (b - a) * t) * ((b - a) * w)[:, None, None]).sum(0)
    return total


def composite_table() -> None:
    """The integrand's profile and the composite rules' error against GL-512."""
    g = minilm_integrand()
    ref = composite(g, (0, 1), (512,))
    profile = g(torch.linspace(0, 1, 21, dtype=torch.float64)).sum(dim=(1, 2))
    print("minilm integrand sum_i g_i(t), t = 0, 0.05, .., 1: "
          + " ".join(f"{float(v):.2f}" for v in profile))
    for edges, nodes in [((0, 1), (32,)), ((0, 1), (64,)), ((0, .5, 1), (16, 16)),
                         ((0, .25, .5, .75, 1), (8, 8, 8, 8)), ((0, .2, .6, 1), (8, 16, 8)),
                         ((0, .2, .4, .6, 1), (6, 10, 10, 6)), ((0, .3, .5, 1), (8, 12, 12))]:
        diff = float((composite(g, edges, nodes) - ref).abs().max() / ref.abs().max())
        print(f"minilm composite GL on {edges} with {nodes} nodes ({sum(nodes)}): "
              f"rel diff vs gl512 {diff:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["llama", "minilm", "all"], default="all")
    p.add_argument("--composite", action="store_true",
                   help="only the composite rules on MiniLM's integrand")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.composite:
        composite_table()
        return
    cases = {"llama": [llama_calls], "minilm": [minilm_calls],
             "all": [llama_calls, minilm_calls]}[args.case]
    for calls in cases:
        for label, call in calls():
            results = {}
            for name, kw in RULES.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the adaptive rule says it missed tol
                    call(**kw)
                    began = time.perf_counter()
                    results[name] = (call(**kw), time.perf_counter() - began)
            ref = results["gl512"][0].attributions
            for name, (res, seconds) in results.items():
                diff = float((res.attributions - ref).abs().max() / ref.abs().max())
                print(f"{label:15s} {name:9s} evaluations {res.evaluations:4d}  gap "
                      f"{float(res.gap[0]):+.2e}  rel diff vs gl512 {diff:.2e}  "
                      f"warm call {seconds * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
