"""``taylor-kernels demo --out DIR``: train a small CNN on scikit-learn's digits and explain it.

Trains (or loads from the weight cache) a smooth CNN on the 8x8 digits (a few seconds on a
CPU), reports its test accuracy, and explains a handful of test images (target = predicted
class) with integrated gradients (zero baseline; Gauss-Legendre with ``--steps`` nodes, and
the adaptive rule), expected gradients (background = 256 training images) and Shapley IG
(coalitions of 2x2 patches, zero reference). Writes ``DIR/report.html`` (the page),
``DIR/digits_attributions.png`` (image | IG | EG | SIG per example) and ``DIR/summary.json``.
Needs scikit-learn and matplotlib.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from taylor_kernels.cli import Parser

MISSING_SKLEARN = ("the demo needs scikit-learn (for its bundled digits data set): "
                   "pip install scikit-learn")
MISSING_MPL = "the demo needs matplotlib to draw its figure: pip install matplotlib"
# gausslog nodes of MiniLM's token-pair Integrated Hessians: its path from [PAD] is far from
# polynomial; the demo's sentences left a gap of 4.4% of max|IG| at 32 nodes (a warning),
# 0.27% at 48, 0.05% at 64 (+0.9 s on the 2-core Xeon, measured 2026-12-03)
PAIR_STEPS = 64


def parse_args(argv):
    p = Parser(prog="taylor-kernels demo", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--examples", type=int, default=8, help="test images to explain (8)")
    p.add_argument("--steps", type=int, default=50, help="Gauss-Legendre nodes (50)")
    p.add_argument("--tol", type=float, default=1e-4, help="adaptive rule tolerance (1e-4)")
    p.add_argument("--eg-samples", type=int, default=64, help="EG samples per image (64)")
    p.add_argument("--coalitions", type=int, default=32, help="SIG coalitions per image (32)")
    p.add_argument("--no-minilm", action="store_true", help="skip the MiniLM section")
    p.add_argument("--no-causal-lm", action="store_true", help="skip the causal-LM section")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (20); the "
                   "causal LM trains epochs/20 of its steps")
    p.add_argument("--seed", type=int, default=0, help="training seed (0)")
    p.add_argument("--cache-dir", default=None, help="weight cache folder (default "
                   "$TAYLOR_KERNELS_CACHE or ~/.cache/taylor_kernels)")
    p.add_argument("--no-cache", action="store_true", help="always train, save nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("examples", "steps", "eg_samples", "coalitions", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.tol > 0:
        p.error(f"--tol must be positive, got {args.tol}")
    return args


def _pick_examples(y_test, n: int) -> list[int]:
    """The first test image of each class in turn (0, 1, 2, ...), then the next ones."""
    chosen, seen = [], set()
    for i, label in enumerate(y_test.tolist()):
        if label not in seen:
            seen.add(label)
            chosen.append(i)
    chosen = sorted(chosen, key=lambda i: int(y_test[i]))[:n]
    rest = [i for i in range(len(y_test)) if i not in set(chosen)]
    return chosen + rest[:max(0, n - len(chosen))]


def patch_mask(size: int = 8, patch: int = 2) -> "torch.Tensor":
    """Feature mask ``[1, 1, size, size]`` of ``patch x patch`` groups (SIG's players)."""
    import torch
    idx = torch.arange(size) // patch
    return (idx[:, None] * (size // patch) + idx[None, :]).view(1, 1, size, size)


def explain(model, x, background, args, progress: bool = True) -> dict:
    """IG (Gauss-Legendre and adaptive), EG and SIG of the predicted class for images ``x``.

    Returns ``{"pred", "prob", "delta", "methods": {name: AttributionResult}, "seconds"}``;
    ``delta = f(x) - f(0)`` for the predicted class.
    """
    import torch

    import taylor_kernels as tk
    from taylor_kernels.progress import progress_bar

    with torch.no_grad():
        logits = model(x)
        pred = logits.argmax(1)
        prob = torch.softmax(logits, 1).gather(1, pred[:, None])[:, 0]
        delta = logits.gather(1, pred[:, None])[:, 0] - model(torch.zeros_like(x)).gather(
            1, pred[:, None])[:, 0]
    runs = {
        "IG": lambda: tk.integrated_gradients(model, x, target=pred, steps=args.steps),
        "IG adaptive": lambda: tk.integrated_gradients(model, x, target=pred, rule="adaptive",
                                                       tol=args.tol),
        "EG": lambda: tk.expected_gradients(model, x, background, target=pred,
                                            samples=args.eg_samples, seed=args.seed),
        "SIG": lambda: tk.shapley_integrated_gradients(
            model, x, torch.zeros_like(x[:1]), target=pred, coalitions=args.coalitions,
            feature_mask=patch_mask(x.shape[-1]), seed=args.seed, steps=16),
    }
    methods, seconds = {}, {}
    for name in progress_bar(progress, runs, desc="explaining", unit="method"):
        t0 = time.perf_counter()
        methods[name] = runs[name]()
        seconds[name] = time.perf_counter() - t0
    return {"pred": pred, "prob": prob, "delta": delta, "methods": methods, "seconds": seconds}


def _method_rows(out: dict, indices: list[int], labels) -> list[dict]:
    """One JSON-able row per (example, method): gap, relative gap, evaluations per input."""
    rows = []
    for j, i in enumerate(indices):
        for name, res in out["methods"].items():
            gap, delta = float(res.gap[j]), float(out["delta"][j])
            rows.append({"index": i, "label": int(labels[i]), "pred": int(out["pred"][j]),
                         "method": name, "gap": gap, "rel_gap_vs_zero_baseline":
                         abs(gap) / max(abs(delta), 1e-12),
                         "evaluations_per_input": res.evaluations // len(indices)
                         if res.nodes_per_input is None else int(res.nodes_per_input[j])})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print(f"taylor-kernels demo: {MISSING_SKLEARN}", file=sys.stderr)
        return 1
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        print(f"taylor-kernels demo: {MISSING_MPL}", file=sys.stderr)
        return 1
    import torch

    from taylor_kernels.demo import digits, exact, plots, report, second_order

    t_start = time.perf_counter()
    out = Path(args.out)
    try:  # before training, not after: one line, exit 2 (as the other usage errors)
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-check").touch()
        (out / ".write-check").unlink()
    except OSError as exc:
        print(f"taylor-kernels demo: error: --out {str(out)!r} is not a writable folder "
              f"({exc.strerror or exc})", file=sys.stderr)
        return 2
    cfg = digits.TrainConfig(epochs=args.epochs, seed=args.seed)
    x_tr, y_tr, x_te, y_te = digits.load_data(cfg.test_fraction, seed=0)
    cache = None if args.no_cache else (Path(args.cache_dir) if args.cache_dir
                                        else digits.default_cache_dir())
    model, info = digits.trained_model(cfg, x_tr, y_tr, cache)
    acc = digits.accuracy(model, x_te, y_te)
    how = (f"loaded from {info['cache_path']}" if info["cached"]
           else f"trained in {info['train_s']:.1f} s")
    print(f"digits CNN ({digits.ARCH}, {len(y_tr)} train / {len(y_te)} test images): {how}; "
          f"test accuracy {acc:.1%}")
    n = max(1, min(args.examples, len(y_te)))
    indices = _pick_examples(y_te, n)
    background = x_tr[torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(0))[:256]]
    out_ex = explain(model, x_te[indices], background, args, not args.no_progress)
    rows = _method_rows(out_ex, indices, y_te)
    _print_rows(rows)
    figure_methods = ["IG", "EG", "SIG"]
    examples = [{"index": i, "label": int(y_te[i]), "pred": int(out_ex["pred"][j]),
                 "prob": float(out_ex["prob"][j]), "image": x_te[i, 0],
                 "attr": {m: out_ex["methods"][m].attributions[j, 0].detach()
                          for m in figure_methods},
                 "caption": {m: f"gap {float(out_ex['methods'][m].gap[j]):+.1e}"
                             for m in figure_methods}} for j, i in enumerate(indices)]
    png = plots.method_grid_figure(
        examples, figure_methods, out / "digits_attributions.png",
        f"digits CNN (test accuracy {acc:.1%}), predicted class: IG (zero baseline, "
        f"GL{args.steps}), EG ({args.eg_samples} samples), SIG ({args.coalitions} coalitions "
        "of 2x2 patches)")
    summary = {
        "model": digits.ARCH, "train_config": asdict(cfg), "config_key": cfg.key(),
        "train_images": len(y_tr), "test_images": len(y_te), "test_accuracy": acc, **info,
        "steps": args.steps, "tol": args.tol, "eg_samples": args.eg_samples,
        "coalitions": args.coalitions, "method_seconds": out_ex["seconds"], "rows": rows,
        "figure": str(png),
    }
    second = second_order.second_order_section(model, x_te[indices[:1]],
                                               int(out_ex["pred"][0]), out)
    summary["ih_completeness_gap"] = second.pop("ih_completeness_gap")
    sections = [second, exact.exact_section(x_tr, y_tr, x_te, y_te, indices[:4], out, summary,
                                            args.epochs)]
    sections += [] if args.no_minilm else [_minilm_section(out, summary)]
    if not args.no_causal_lm:
        from taylor_kernels.demo.causal_lm import causal_lm_section
        sections.append(causal_lm_section(out, summary, args.epochs, cache))
    page = report.write_html(out / "report.html", "taylor-kernels demo: digits CNN", [
        f"{digits.ARCH}: {len(y_tr)} training / {len(y_te)} test images of scikit-learn's "
        f"digits, {how}, test accuracy {acc:.1%}.",
        "Each method explains the predicted class. gap = sum(attributions) - (f(x) - mean "
        "f(baseline)): completeness holds when it is near zero (EG's gap is its Monte Carlo "
        "error: one random baseline and t per sample). Seconds per method: "
        + ", ".join(f"{k} {v:.2f}" for k, v in out_ex["seconds"].items()) + "."],
        [{"heading": "Attributions", "figures": [png]},
         {"heading": "Completeness and cost", "table": {
             "headers": ["test #", "label", "pred", "method", "gap", "|gap| / |f(x)-f(0)|",
                         "evaluations per input"],
             "rows": [[r["index"], r["label"], r["pred"], r["method"], f"{r['gap']:+.2e}",
                       f"{r['rel_gap_vs_zero_baseline']:.1e}", r["evaluations_per_input"]]
                      for r in rows]}}] + sections)
    summary["report"] = str(page)
    summary["wall_s"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {page}, {png} and {out / 'summary.json'} ({summary['wall_s']:.1f} s)")
    return 0


def _minilm_section(out: Path, summary: dict) -> dict:
    """Token attributions of a MiniLM sentence similarity (layer IG on the token embeddings),
    or a note saying how to install the offline weights package."""
    from taylor_kernels.demo import minilm
    heading = "Transformer: MiniLM sentence similarity, layer IG on token embeddings"
    try:
        sentences = ("A man is playing a guitar on stage.", "Someone performs music for a crowd.")
        res = minilm.explain_similarity(*sentences, out)
    except ImportError:
        print(f"demo: MiniLM section skipped: {minilm.MISSING}")
        return {"heading": heading, "text": f"Skipped: {minilm.MISSING}."}
    summary["minilm"] = {k: v for k, v in res.items() if k != "png"}
    pairs = minilm.token_interactions(*minilm.load(), sentences[0], sentences[1],
                                      steps=PAIR_STEPS)
    png_pairs = out / "minilm_token_interactions.png"
    from taylor_kernels import plots
    plots.interaction_heatmap(pairs["interactions"].abs().detach(), pairs["tokens"],
                              title="|token-pair Integrated Hessians| of the similarity",
                              path=png_pairs)
    summary["minilm"]["token_interaction_completeness_gap"] = pairs["completeness_gap"]
    print(f"MiniLM similarity {res['similarity']:.3f}: token attributions in {res['png']}, "
          f"token interactions in {png_pairs}")
    return {"heading": heading, "figures": [Path(res["png"]), png_pairs],
            "text": f"Cosine similarity {res['similarity']:.3f}; each token's attribution to "
                    f"it ({res['steps']} Gauss-Legendre steps; baseline: [CLS] [PAD].. [SEP]; "
                    f"completeness gaps {res['gap_a']:+.1e}, {res['gap_b']:+.1e}); below, "
                    f"token-pair Integrated Hessians of the first sentence ({PAIR_STEPS} "
                    f"gausslog nodes, completeness gap {pairs['completeness_gap']:.1e})."}


def _print_rows(rows: list[dict]) -> None:
    print(f"{'test#':>5} {'label':>5} {'pred':>4}  {'method':<12} {'gap':>10} {'rel':>8} "
          f"{'evals/input':>11}")
    for r in rows:
        print(f"{r['index']:5d} {r['label']:5d} {r['pred']:4d}  {r['method']:<12} "
              f"{r['gap']:+10.2e} {r['rel_gap_vs_zero_baseline']:8.1e} "
              f"{r['evaluations_per_input']:11d}")
