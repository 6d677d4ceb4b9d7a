"""The fourteen attribution methods as allocations of Taylor terms, scored on three principles.

Builds a sparse random cubic polynomial (as a power network: all Taylor terms exact), trains a
small smooth MLP (tanh/softplus) and a small CNN briefly on synthetic tasks with interactions,
then, for one input of each (baseline 0, target = predicted class), runs
:func:`taylor_kernels.unification_table`: P1 = completeness error of the method on the model;
P2 / P3 = magnitude-weighted departure of the shares it gives the model's largest Taylor terms
(independent / interaction) from the fair allocation, measured by applying it to each term
alone (a power-network probe). Background methods use 8 training inputs as references.
Writes ``unification_<model>.md``, ``unification_<model>.png`` and ``unification.json``.

Usage: python python/unification_table.py [--out DIR] [--small] [--terms 24] [--order 3]
       [--no-plots]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import taylor_kernels as tk
from taylor_kernels.attr.unification import polynomial_network


def mlp_task(n: int, d: int, gen: torch.Generator):
    """Three classes scored by smooth functions with pairwise and higher-order interactions."""
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    scores = torch.stack([X[:, 0] * X[:, 1] + X[:, 2], X[:, 3] ** 2 - X[:, 4] - 1,
                          torch.tanh(X[:, 5 % d] + X[:, 1] * X[:, 3 % d])], dim=1)
    return X, scores.argmax(1)


def cnn_task(n: int, size: int, gen: torch.Generator):
    """Images [2, size, size]: classes by channel products and squares in image halves."""
    X = torch.randn(n, 2, size, size, generator=gen, dtype=torch.float64)
    h = size // 2
    top, left = X[:, :, :h].mean((2, 3)), X[:, :, :, :h].mean((2, 3))
    scores = torch.stack([top[:, 0] * top[:, 1] * 4, left[:, 0] ** 2 * 4 - 0.5,
                          X[:, 1, h:, h:].mean((1, 2)) * 2], dim=1)
    return X, scores.argmax(1)


def polynomial_task(n: int, d: int, gen: torch.Generator):
    """A sparse random cubic polynomial as a power network (every Taylor term exact, residual
    0 at order 3), inputs ``U(0.5, 1.5)^d``; returns ``(X, model)``."""
    terms = []
    for _ in range(2 * d):
        k = int(torch.randint(1, 4, (1,), generator=gen))
        kappa = tuple(sorted(torch.randint(0, d, (k,), generator=gen).tolist()))
        terms.append((float(torch.randn(1, generator=gen)), kappa))
    X = 0.5 + torch.rand(n, d, generator=gen, dtype=torch.float64)
    return X, polynomial_network(terms, torch.zeros(d, dtype=torch.float64))


def make_mlp(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(),
                         nn.Linear(16, 3)).double()


def make_cnn(size: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.Softplus(), nn.Flatten(),
                         nn.Linear(4 * (size // 2) ** 2, 3)).double()


def train(model: nn.Module, X, y, steps: int, lr: float) -> float:
    """Full-batch gradient descent with momentum 0.9 (torch.optim's first use imports
    torch._dynamo, seconds on a busy CPU); returns training accuracy."""
    params = list(model.parameters())
    velocity = [torch.zeros_like(p) for p in params]
    for _ in range(steps):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(X), y), params)
        with torch.no_grad():
            for p, v, g in zip(params, velocity, grads):
                v.mul_(0.9).add_(g)
                p.sub_(lr * v)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())


def score(name, model, X, args) -> dict:
    x = X[-1:]
    target = int(model(x).argmax(1))
    settings = tk.MethodSettings(background=X[:8], ig_steps=args.steps,
                                 eg_samples=args.samples, smoothgrad_samples=args.samples // 4,
                                 permutations=args.permutations, seed=args.seed)
    t0 = time.perf_counter()
    table = tk.unification_table(model, x, None, target, order=args.order,
                                 max_terms=args.terms, max_sets=args.max_sets,
                                 settings=settings)
    seconds = time.perf_counter() - t0
    md = f"## {name} (target class {target})\n\n{table.markdown()}\n"
    print(md)
    (args.out / f"unification_{name}.md").write_text(md)
    if not args.no_plots:
        table.plot(args.out / f"unification_{name}.png")
    return {"target": target, "seconds": seconds, **table.to_dict()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default ./unification_out; with --small a temporary "
                        "directory, as the other scripts' smoke runs)")
    p.add_argument("--order", type=int, default=3, help="highest Taylor order probed")
    p.add_argument("--terms", type=int, default=24, help="Taylor terms probed per model")
    p.add_argument("--max-sets", type=int, default=20000,
                   help="itemize an order only if it has at most this many index multisets")
    p.add_argument("--steps", type=int, default=32, help="IG quadrature nodes")
    p.add_argument("--samples", type=int, default=64, help="EG samples (SmoothGrad: 1/4)")
    p.add_argument("--permutations", type=int, default=32, help="Shapley orders when D > 12")
    p.add_argument("--train-steps", type=int, default=300,
                   help="training steps of the small models")
    p.add_argument("--lr", type=float, default=0.02,
                   help="step size; larger trains sharper models whose Taylor series at the "
                        "baseline no longer converges at the input (large residual)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (tiny models run fastest on one)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG heatmaps")
    p.add_argument("--small", action="store_true", help="tiny models and budgets (smoke test)")
    a = p.parse_args(argv)
    d, size, n = 10, 6, 512
    if a.small:
        d, size, n, a.terms, a.steps, a.samples, a.permutations, a.train_steps, a.max_sets = \
            6, 4, 64, 6, 8, 8, 4, 20, 600
    if a.out is None:
        a.out = Path(tempfile.mkdtemp(prefix="unification-small-")) if a.small \
            else Path("unification_out")
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)
    results = {}
    X, poly = polynomial_task(n, d, gen)
    results["polynomial"] = score("polynomial", poly, X, a)
    for name, (X, y), model in (("mlp", mlp_task(n, d, gen), make_mlp(d)),
                                ("cnn", cnn_task(n, size, gen), make_cnn(size))):
        acc = train(model, X, y, a.train_steps, a.lr)
        print(f"{name}: training accuracy {acc:.3f} ({a.train_steps} momentum GD steps, n={n})")
        results[name] = {"train_accuracy": acc, **score(name, model, X, a)}
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    (a.out / "unification.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out}/unification.json, unification_<model>.md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
