"""DAPr on two moons with nuisance features (PAPERS.md section 5).

Data: ``sklearn.datasets.make_moons`` (1000 points, noise 0.1) plus ``N`` nuisance features
``N(0, 1)``, columns shuffled; split 200 train / 400 validation / 400 test. Meta-features of
feature j: ``(std_j, mean_j)`` over the training set. For each ``N`` and repeat, the same MLP
is trained without the prior (cross-entropy) and with it (DAPr: joint training of the prior
net, expected-gradient penalty weight ``lambda`` picked from ``--lams`` on validation
accuracy), both with Adam and early stopping on validation accuracy; test accuracy is
reported, mean and std over repeats.

Usage: python python/dapr_two_moons.py [--small] [--out-dir DIR]  (default bench/results/dapr;
       --small: a temporary directory)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from sklearn.datasets import make_moons
from torch import nn

from taylor_kernels import priors


def make_data(n_nuisance: int, seed: int, n: int = 1000, split=(200, 400, 400)):
    """``(train, val, test)`` pairs of ``(X [n_i, 2 + N], y [n_i])``, float32."""
    xm, y = make_moons(n_samples=n, noise=0.1, random_state=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.tensor(xm, dtype=torch.float32),
                   torch.randn(n, n_nuisance, generator=gen)], dim=1)
    x = x[:, torch.randperm(x.shape[1], generator=gen)]
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(n, generator=gen)
    a, b = split[0], split[0] + split[1]
    parts = (order[:a], order[a:b], order[b:b + split[2]])
    return tuple((x[p], y[p]) for p in parts)


def make_model(d: int, hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 2))


def one_repeat(n_nuisance: int, seed: int, args) -> dict:
    """Test accuracy without and with the prior for one data draw."""
    train, val, test = make_data(n_nuisance, seed, n=args.points, split=args.split)
    d = train[0].shape[1]
    meta = priors.feature_metadata(train[0])
    kw = dict(epochs=args.epochs, batch_size=args.batch, lr=args.lr, patience=args.patience,
              seed=seed)
    t0 = time.perf_counter()
    base = make_model(d, args.hidden, seed)
    fb = priors.fit(base, train, val, **kw)
    row = {"n_nuisance": n_nuisance, "seed": seed, "base_test": priors.accuracy(base, *test),
           "base_val": fb.best_val_accuracy, "base_epochs": len(fb.history),
           "base_s": time.perf_counter() - t0}
    best, spent = None, row["base_s"]
    for lam in args.lams:
        t0 = time.perf_counter()
        model, prior = make_model(d, args.hidden, seed), priors.PriorNet(meta.shape[1])
        fr = priors.fit(model, train, val, prior_net=prior, meta=meta, lam=lam, **kw)
        cand = {"lam": lam, "val": fr.best_val_accuracy, "test": priors.accuracy(model, *test),
                "epochs": len(fr.history), "s": time.perf_counter() - t0}
        spent += cand["s"]
        if best is None or cand["val"] > best["val"]:
            best = cand
    row.update({f"prior_{k}": v for k, v in best.items()})
    print(f"N={n_nuisance} seed={seed}: test acc without prior {row['base_test']:.3f}, with "
          f"prior {row['prior_test']:.3f} (lambda {best['lam']:g}, "
          f"{spent:.0f} s for all {1 + len(args.lams)} fits)", flush=True)
    return row


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for n in sorted({r["n_nuisance"] for r in rows}):
        sel = [r for r in rows if r["n_nuisance"] == n]
        base = torch.tensor([r["base_test"] for r in sel], dtype=torch.float64)
        prior = torch.tensor([r["prior_test"] for r in sel], dtype=torch.float64)
        out.append({"n_nuisance": n, "repeats": len(sel), "base_mean": base.mean().item(),
                    "base_std": base.std().item() if len(sel) > 1 else 0.0,
                    "prior_mean": prior.mean().item(),
                    "prior_std": prior.std().item() if len(sel) > 1 else 0.0,
                    "prior_wins": int((prior > base).sum()), "ties": int((prior == base).sum())})
    return out


def markdown(summary: list[dict], args) -> str:
    lines = ["| nuisance N | repeats | test acc, no prior | test acc, DAPr | DAPr better / tie |",
             "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['n_nuisance']} | {s['repeats']} | {s['base_mean']:.3f} ± "
                     f"{s['base_std']:.3f} | {s['prior_mean']:.3f} ± {s['prior_std']:.3f} | "
                     f"{s['prior_wins']} / {s['ties']} |")
    lines.append("")
    lines.append(f"mean ± std over repeats; MLP {args.hidden}-{args.hidden} ReLU, Adam lr "
                 f"{args.lr}, batch {args.batch}, <= {args.epochs} epochs, early stopping "
                 f"(patience {args.patience}) on validation accuracy; lambda from {args.lams} "
                 f"by validation accuracy; split {args.split}.")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = [s["n_nuisance"] for s in summary]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("base", "no prior"), ("prior", "DAPr prior")):
        ax.errorbar(n, [s[f"{key}_mean"] for s in summary], [s[f"{key}_std"] for s in summary],
                    marker="o", capsize=3, label=label)
    ax.set_xlabel("nuisance features N")
    ax.set_ylabel("test accuracy")
    ax.set_title("two moons + N(0,1) nuisance features")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="smoke test: tiny sizes, 1 repeat")
    p.add_argument("--nuisance", type=int, nargs="+", default=[100, 500, 1000],
                   help="numbers of nuisance features to run")
    p.add_argument("--repeats", type=int, default=5, help="seeds per nuisance count")
    p.add_argument("--lams", type=float, nargs="+", default=[0.1, 1.0],
                   help="prior penalty weights tried (best kept on validation)")
    p.add_argument("--epochs", type=int, default=200, help="training epochs (at most)")
    p.add_argument("--patience", type=int, default=40, help="early-stopping patience (epochs)")
    p.add_argument("--hidden", type=int, default=64, help="hidden width of the MLP")
    p.add_argument("--batch", type=int, default=32, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--out-dir", default=None,
                   help="output directory (default bench/results/dapr; with --small a "
                        "temporary directory, so a smoke run never replaces the recorded "
                        "results)")
    args = p.parse_args(argv)
    args.points, args.split = 1000, (200, 400, 400)
    if args.small:
        args.nuisance, args.repeats, args.epochs, args.patience = [20], 1, 3, 2
        args.hidden, args.lams, args.points, args.split = 8, [1.0], 200, (60, 70, 70)
    if args.out_dir is None:
        args.out_dir = (tempfile.mkdtemp(prefix="dapr-small-") if args.small
                        else "bench/results/dapr")
    torch.set_num_threads(1)
    rows = [one_repeat(n, seed, args) for n in args.nuisance for seed in range(args.repeats)]
    summary = summarize(rows)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(summary, args)
    (out / "two_moons.md").write_text(table)
    result = {"summary": summary, "rows": rows,
              "config": {k: v for k, v in vars(args).items() if k != "out_dir"}}
    (out / "two_moons.json").write_text(json.dumps(result, indent=1))
    plot(summary, out / "two_moons.png")
    print(table)
    print(f"written to {out}/two_moons.{{md,json,png}}")
    return result


if __name__ == "__main__":
    main()
