"""``taylor-kernels demo --out DIR``: train a small CNN on scikit-learn's digits and explain it.

Trains (or loads from the weight cache) a smooth CNN on the 8x8 digits (a few seconds on a
CPU), reports its test accuracy, explains a handful of test images with
``tk.integrated_gradients`` (Gauss-Legendre with ``--steps`` nodes and the adaptive rule,
zero baseline, target = predicted class), and writes ``DIR/digits_ig.png`` (image | heatmap
per example) and ``DIR/summary.json``. Needs scikit-learn and matplotlib.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

MISSING_SKLEARN = ("the demo needs scikit-learn (for its bundled digits data set): "
                   "pip install scikit-learn")
MISSING_MPL = "the demo needs matplotlib to draw its figure: pip install matplotlib"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="taylor-kernels demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--examples", type=int, default=8, help="test images to explain (8)")
    p.add_argument("--steps", type=int, default=50, help="Gauss-Legendre nodes (50)")
    p.add_argument("--tol", type=float, default=1e-4, help="adaptive rule tolerance (1e-4)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (20)")
    p.add_argument("--seed", type=int, default=0, help="training seed (0)")
    p.add_argument("--cache-dir", default=None, help="weight cache folder (default "
                   "$TAYLOR_KERNELS_CACHE or ~/.cache/taylor_kernels)")
    p.add_argument("--no-cache", action="store_true", help="always train, save nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


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


def explain(model, x, steps: int, tol: float, indices: list[int], progress: bool = True):
    """Per image: IG with Gauss-Legendre ``steps`` nodes and with the adaptive rule."""
    import torch
    from tqdm.auto import tqdm

    import taylor_kernels as tk

    results = []
    for i in tqdm(indices, desc="explaining", unit="img", disable=not progress):
        xi = x[i:i + 1]
        with torch.no_grad():
            logits = model(xi)
            pred = int(logits.argmax(1))
            prob = float(torch.softmax(logits, 1)[0, pred])
            delta = float(logits[0, pred] - model(torch.zeros_like(xi))[0, pred])
        gl = tk.integrated_gradients(model, xi, target=pred, steps=steps, rule="gausslegendre")
        ad = tk.integrated_gradients(model, xi, target=pred, rule="adaptive", tol=tol)
        results.append({
            "index": i, "pred": pred, "prob": prob, "f_x_minus_f_0": delta, "steps": steps,
            "gl_gap": float(gl.gap[0]), "gl_rel_gap": abs(float(gl.gap[0])) / abs(delta),
            "gl_evals": gl.evaluations,
            "ad_gap": float(ad.gap[0]), "ad_rel_gap": abs(float(ad.gap[0])) / abs(delta),
            "ad_evals": ad.evaluations,
            "gl_vs_adaptive_max_abs_diff": float((gl.attributions - ad.attributions).abs().max()),
            "attr": gl.attributions[0, 0].detach(), "image": xi[0, 0]})
    return results


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
    from taylor_kernels.demo import digits, plots

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    t0 = time.perf_counter()
    results = explain(model, x_te, args.steps, args.tol, indices, not args.no_progress)
    explain_s = time.perf_counter() - t0
    for r in results:
        r["label"] = int(y_te[r["index"]])
    print(f"{'test#':>5} {'label':>5} {'pred':>4} {'p':>5}  {'GL' + str(args.steps) + ' gap':>11}"
          f" {'rel':>8}  {'adaptive evals':>14} {'gap':>10} {'rel':>8}")
    for r in results:
        print(f"{r['index']:5d} {r['label']:5d} {r['pred']:4d} {r['prob']:5.2f}  "
              f"{r['gl_gap']:+11.2e} {r['gl_rel_gap']:8.1e}  {r['ad_evals']:14d} "
              f"{r['ad_gap']:+10.2e} {r['ad_rel_gap']:8.1e}")
    png = plots.heatmap_figure(
        results, out / "digits_ig.png",
        f"Integrated Gradients, digits CNN (test accuracy {acc:.1%}); zero baseline, "
        f"target = predicted class")
    summary = {
        "model": digits.ARCH, "train_config": asdict(cfg), "config_key": cfg.key(),
        "train_images": len(y_tr), "test_images": len(y_te), "test_accuracy": acc, **info,
        "steps": args.steps, "tol": args.tol, "explain_s": explain_s,
        "examples": [{k: v for k, v in r.items() if k not in ("attr", "image")}
                     for r in results],
        "mean_adaptive_evals": sum(r["ad_evals"] for r in results) / len(results),
        "figure": str(png), "wall_s": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {png} and {out / 'summary.json'} ({summary['wall_s']:.1f} s)")
    return 0
