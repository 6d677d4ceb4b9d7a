"""Pairwise interaction detection on the ten synthetic functions of NID (Tsang et al., ICLR 2018).

For each function F1..F10 of 10 variables: draw data (F1: x1,x2,x3,x6,x7,x9 ~ U(0,1) and
x4,x5,x8,x10 ~ U(0.6,1); F2..F10: all x ~ U(-1,1)), split train/validation/test equally, train
an MLP 10-140-100-60-20-1 with GELU (Adam, lr 1e-3, batch 100, L1 penalty 5e-5 on the weights
as in NID, the weights of the best validation epoch kept; targets standardised), then score
every pair {i, j} on the same trained network by

- cross derivatives: ``mean_n |d^2 f(x_n) / dx_i dx_j|`` over test points
  (``tk.global_interactions``, Lerman et al.);
- Integrated Hessians: ``mean_n |Gamma_ij(x_n)|`` from the training-data mean as baseline
  (``tk.integrated_hessians``, Janizek et al.);
- NID: ``sum_u z_u min(|W1_ui|, |W1_uj|)`` with ``z = |w_out| |W4| |W3| |W2|`` (the aggregated
  influence of first-layer unit ``u`` on the output), Tsang et al.'s pairwise score;

and report the ROC-AUC of each score against the ground truth (a pair is positive when it lies
inside one ground-truth interaction set). Formula readings where public re-implementations
disagree (our choices): F2 takes ``sqrt(|x7| / (1 + |x8|))`` (the paper's ``sqrt(x7/...)`` is
undefined for x7 < 0 under U(-1,1)); F3/F4 read ``x3^(2|x4|)`` as ``(x3^2)^|x4|``; F5 is
``sqrt(exp(x4 + x5))``; F7 adds ``sum_i x_i``.

Usage: ``python python/nid_interactions.py [--small] [--out DIR] [--functions F1,F5]
[--samples N] [--epochs E] [--eval-points P]``. Writes ``nid.md`` and ``nid.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import taylor_kernels as tk


def _f1(x):
    x1, x2, x3, x4, x5, x6, x7, x8, x9, x10 = x.unbind(1)
    return (math.pi ** (x1 * x2) * torch.sqrt(2 * x3) - torch.asin(x4) + torch.log(x3 + x5)
            - x9 / x10 * torch.sqrt(x7 / x8) - x2 * x7)


def _f2(x):
    x1, x2, x3, x4, x5, x6, x7, x8, x9, x10 = x.unbind(1)
    return (math.pi ** (x1 * x2) * torch.sqrt(2 * x3.abs()) - torch.asin(0.5 * x4)
            + torch.log((x3 + x5).abs() + 1)
            + x9 / (1 + x10.abs()) * torch.sqrt(x7.abs() / (1 + x8.abs())) - x2 * x7)


def _f3(x):
    x1, x2, x3, x4, x5, x6, x7, x8, x9, x10 = x.unbind(1)
    return (torch.exp((x1 - x2).abs()) + (x2 * x3).abs() - (x3 ** 2) ** x4.abs()
            + torch.log(x4 ** 2 + x5 ** 2 + x7 ** 2 + x8 ** 2) + x9 + 1 / (1 + x10 ** 2))


def _f4(x):
    return _f3(x) + (x[:, 0] * x[:, 3]) ** 2


def _f5(x):
    x1, x2, x3, x4, x5, x6, x7, x8, x9, x10 = x.unbind(1)
    return (1 / (1 + x1 ** 2 + x2 ** 2 + x3 ** 2) + torch.sqrt(torch.exp(x4 + x5))
            + (x6 + x7).abs() + x8 * x9 * x10)


def _f6(x):
    x1, x2, x3, x4, x5, x6, x7, x8, x9, x10 = x.unbind(1)
    return (torch.exp((x1 * x2).abs() + 1) - torch.exp((x3 + x4).abs() + 1)
            + torch.cos(x5 + x6 - x8) + torch.sqrt(x8 ** 2 + x9 ** 2 + x10 ** 2))


def _f7(x):
    x1, x2, x3, x4, x5, x6, x7, x8, x9, x10 = x.unbind(1)
    return ((torch.atan(x1) + torch.atan(x2)) ** 2 + torch.relu(x3 * x4 + x6)
            - 1 / (1 + (x4 * x5 * x6 * x7 * x8) ** 2) + (x7.abs() / (1 + x9.abs())) ** 5
            + x.sum(dim=1))


def _f8(x):
    x1, x2, x3, x4, x5, x6, x7, x8, x9, x10 = x.unbind(1)
    return (x1 * x2 + 2 ** (x3 + x5 + x6) + 2 ** (x3 + x4 + x5 + x7)
            + torch.sin(x7 * torch.sin(x8 + x9)) + torch.acos(0.9 * x10))


def _f9(x):
    x1, x2, x3, x4, x5, x6, x7, x8, x9, x10 = x.unbind(1)
    return (torch.tanh(x1 * x2 + x3 * x4) * torch.sqrt(x5.abs()) + torch.exp(x5 + x6)
            + torch.log((x6 * x7 * x8) ** 2 + 1) + x9 * x10 + 1 / (1 + x10.abs()))


def _f10(x):
    x1, x2, x3, x4, x5, x6, x7, x8, x9, x10 = x.unbind(1)
    return (torch.sinh(x1 + x2) + torch.acos(torch.tanh(x3 + x5 + x7)) + torch.cos(x4 + x5)
            + 1 / torch.cos(x7 * x9))


# name -> (function, ground-truth interaction sets with 1-based feature numbers)
FUNCTIONS = {
    "F1": (_f1, [{1, 2, 3}, {3, 5}, {7, 8, 9, 10}, {2, 7}]),
    "F2": (_f2, [{1, 2, 3}, {3, 5}, {7, 8, 9, 10}, {2, 7}]),
    "F3": (_f3, [{1, 2}, {2, 3}, {3, 4}, {4, 5, 7, 8}]),
    "F4": (_f4, [{1, 2}, {2, 3}, {3, 4}, {1, 4}, {4, 5, 7, 8}]),
    "F5": (_f5, [{1, 2, 3}, {4, 5}, {6, 7}, {8, 9, 10}]),
    "F6": (_f6, [{1, 2}, {3, 4}, {5, 6, 8}, {8, 9, 10}]),
    "F7": (_f7, [{1, 2}, {3, 4, 6}, {4, 5, 6, 7, 8}, {7, 9}]),
    "F8": (_f8, [{1, 2}, {3, 5, 6}, {3, 4, 5, 7}, {7, 8, 9}]),
    "F9": (_f9, [{1, 2, 3, 4, 5}, {5, 6}, {6, 7, 8}, {9, 10}]),
    "F10": (_f10, [{1, 2}, {3, 5, 7}, {4, 5}, {7, 9}]),
}
PAIRS = [(i, j) for i in range(10) for j in range(i + 1, 10)]


def sample(name: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, 10]`` float64 inputs from the function's distribution."""
    u = torch.rand(n, 10, generator=gen, dtype=torch.float64)
    if name != "F1":
        return 2 * u - 1
    lo = torch.zeros(10, dtype=torch.float64)
    lo[[3, 4, 7, 9]] = 0.6  # x4, x5, x8, x10 ~ U(0.6, 1)
    return lo + (1 - lo) * u


def labels(truth: list[set[int]]) -> list[int]:
    """1 for each pair (0-based, in PAIRS order) contained in a ground-truth set."""
    return [int(any({i + 1, j + 1} <= s for s in truth)) for i, j in PAIRS]


def make_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    sizes = [10, 140, 100, 60, 20]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 1))


def train(model, xtr, ytr, xva, yva, epochs: int, l1: float, seed: int) -> dict:
    """Adam 1e-3, batch 100, MSE + l1 * sum |W| (weights only); keeps the best validation
    epoch. Returns the training log."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = float("inf"), None, -1
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(xtr.shape[0], generator=gen).split(100):
            loss = nn.functional.mse_loss(model(xtr[idx]).squeeze(1), ytr[idx])
            loss = loss + l1 * sum(w.abs().sum() for w in weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = nn.functional.mse_loss(model(xva).squeeze(1), yva).item()
        if val < best:
            best, best_epoch = val, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"val_mse": best, "best_epoch": best_epoch}


def nid_pairwise(model: nn.Sequential) -> torch.Tensor:
    """NID pairwise strengths ``[10, 10]``: ``sum_u z_u min(|W1_ui|, |W1_uj|)``."""
    ws = [m.weight.detach().abs().double() for m in model if isinstance(m, nn.Linear)]
    z = ws[-1]
    for w in reversed(ws[1:-1]):
        z = z @ w
    w1 = ws[0]  # [units, 10]
    mins = torch.minimum(w1.unsqueeze(2), w1.unsqueeze(1))  # [units, 10, 10]
    return torch.einsum("u,uij->ij", z[0], mins)


def auc(strengths: torch.Tensor, y: list[int]) -> float:
    """ROC-AUC of the pair scores: ``P(s_pos > s_neg) + P(s_pos = s_neg) / 2`` over all
    positive/negative pairs (Mann-Whitney; equals sklearn's ``roc_auc_score``)."""
    s = torch.tensor([float(strengths[i, j]) for i, j in PAIRS], dtype=torch.float64)
    lab = torch.tensor(y, dtype=torch.bool)
    pos, neg = s[lab].unsqueeze(1), s[~lab].unsqueeze(0)
    return float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())


def run_function(name: str, cfg: argparse.Namespace, seed: int) -> dict:
    fn, truth = FUNCTIONS[name]
    gen = torch.Generator().manual_seed(seed)
    x = sample(name, 3 * cfg.samples, gen)
    y = fn(x)
    xtr, xva, xte = x.split(cfg.samples)
    ytr, yva, yte = y.split(cfg.samples)
    mu, sd = ytr.mean(), ytr.std()
    model = make_mlp(seed)
    t0 = time.perf_counter()
    log = train(model, xtr.float(), ((ytr - mu) / sd).float(), xva.float(),
                ((yva - mu) / sd).float(), cfg.epochs, cfg.l1, seed)
    train_s = time.perf_counter() - t0
    model = model.double().eval()
    with torch.no_grad():
        pred = model(xte).squeeze(1)
    r2 = 1 - ((pred - (yte - mu) / sd) ** 2).mean() / ((yte - mu) / sd).var()
    pts = xte[:cfg.eval_points]
    t0 = time.perf_counter()
    cross = tk.global_interactions(model, pts, aggregate="mean").strengths
    cross_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ih = tk.integrated_hessians(model, pts, baselines=xtr.mean(0), steps=cfg.ih_steps)
    ih_strength = ih.interactions.abs().mean(0)
    ih_s = time.perf_counter() - t0
    y_pairs = labels(truth)
    return {"function": name, "test_r2": float(r2), **log, "train_s": train_s,
            "auc_cross": auc(cross, y_pairs), "auc_ih": auc(ih_strength, y_pairs),
            "auc_nid": auc(nid_pairwise(model), y_pairs), "cross_s": cross_s, "ih_s": ih_s,
            "ih_completeness_gap": float(ih.completeness_gap.max()),
            "positive_pairs": sum(y_pairs)}


def table(rows: list[dict], cfg: argparse.Namespace) -> str:
    head = ("| function | test R^2 | AUC cross-deriv. | AUC Integrated Hessians | AUC NID | "
            "train s | cross s | IH s |\n|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['function']} | {r['test_r2']:.3f} | {r['auc_cross']:.3f} | "
                   f"{r['auc_ih']:.3f} | {r['auc_nid']:.3f} | {r['train_s']:.1f} | "
                   f"{r['cross_s']:.2f} | {r['ih_s']:.2f} |\n" for r in rows)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("auc_cross", "auc_ih", "auc_nid")}
    foot = (f"| mean | | {mean['auc_cross']:.3f} | {mean['auc_ih']:.3f} | "
            f"{mean['auc_nid']:.3f} | | | |\n")
    note = (f"\n{cfg.samples} train / {cfg.samples} validation / {cfg.samples} test samples, "
            f"{cfg.epochs} epochs (best validation kept), L1 {cfg.l1:g}; interaction scores on "
            f"{cfg.eval_points} test points; IH {cfg.ih_steps} gausslog nodes from the training "
            "mean. Scores: ROC-AUC of the 45 pairwise strengths against the ground-truth "
            "pairs.\n")
    return head + body + foot + note


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny smoke run (2 functions)")
    p.add_argument("--out", default=None,
                   help="output directory (default bench/results/nid; with --small a "
                        "temporary directory, so a smoke run never replaces the recorded "
                        "results)")
    p.add_argument("--functions", default=None, help="comma-separated subset, e.g. F1,F5")
    p.add_argument("--samples", type=int, default=10_000, help="per split")
    p.add_argument("--epochs", type=int, default=100, help="training epochs per function")
    p.add_argument("--eval-points", type=int, default=1000, help="test points scored per function")
    p.add_argument("--ih-steps", type=int, default=16, help="Integrated Hessians nodes")
    p.add_argument("--l1", type=float, default=5e-5, help="L1 weight penalty of the trained MLP")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    cfg = p.parse_args(argv)
    if cfg.small:
        cfg.samples, cfg.epochs, cfg.eval_points, cfg.ih_steps = 300, 3, 32, 8
    if cfg.out is None:
        cfg.out = tempfile.mkdtemp(prefix="nid-small-") if cfg.small else "bench/results/nid"
    names = (cfg.functions.split(",") if cfg.functions else
             ["F1", "F5"] if cfg.small else list(FUNCTIONS))
    unknown = [n for n in names if n not in FUNCTIONS]
    if unknown:
        p.error(f"unknown functions {unknown}; choose from {list(FUNCTIONS)}")
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend (measured 3 vs 19+ ms/step)
    rows = []
    for k, name in enumerate(names):
        rows.append(run_function(name, cfg, cfg.seed + k))
        r = rows[-1]
        print(f"{name}: R2 {r['test_r2']:.3f}  AUC cross {r['auc_cross']:.3f}  "
              f"IH {r['auc_ih']:.3f}  NID {r['auc_nid']:.3f}  (train {r['train_s']:.1f}s)",
              flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows, cfg)
    (out / "nid.md").write_text("# Pairwise interaction detection on the NID functions\n\n" + text)
    (out / "nid.json").write_text(json.dumps({"config": vars(cfg), "rows": rows}, indent=1))
    print(text)
    print(f"written to {out}/nid.{{md,json}}")


if __name__ == "__main__":
    main()
