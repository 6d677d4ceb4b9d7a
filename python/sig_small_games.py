"""SIG vs IG vs EG against exact Shapley values on small games (n <= 10 players).

A game is a smooth function ``f: R^n -> R`` with interactions; the Shapley value of player i
at input x, with absent players at the reference r (here 0), is
``phi_i = sum_{S not containing i} |S|! (n-|S|-1)! / n! * (v(S + i) - v(S))``,
``v(S) = f(x_S, r_rest)``, enumerated exactly over all 2^n coalitions.
Each method gets the same budget of model evaluations. Error = L1 distance between
attribution *proportions* ``a / sum|a|`` and Shapley's, plus Spearman rank correlation.
Two game families: sparse polynomials with powers up to 3 (non-multilinear: IG shares a term
``z_i^p z_j^q`` as ``p : q``, Shapley as ``1 : 1``), and sums of tanh of random feature sets.

Usage: python python/sig_small_games.py [--games 24] [--small] [--out results.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import torch

import taylor_kernels as tk


def polynomial_game(n: int, gen: torch.Generator):
    terms = []
    for _ in range(2 * n):
        size = int(torch.randint(1, 4, (1,), generator=gen))
        players = torch.randperm(n, generator=gen)[:size]
        powers = torch.randint(1, 4, (size,), generator=gen).double()
        terms.append((players, powers, float(torch.randn(1, generator=gen))))

    def f(z):
        return sum(c * torch.prod(z[:, p] ** q, dim=1) for p, q, c in terms)
    return f


def tanh_game(n: int, gen: torch.Generator):
    W = torch.randn(2 * n, n, generator=gen, dtype=torch.float64)
    W = W * (torch.rand(2 * n, n, generator=gen) < 0.4)  # sparse: each unit couples a few
    c = torch.randn(2 * n, generator=gen, dtype=torch.float64)
    return lambda z: (c * torch.tanh(z @ W.T)).sum(1)


def exact_shapley(f, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Shapley values [n] of the game v(S) = f(x on S, ref elsewhere), by enumeration."""
    n = x.shape[0]
    masks = torch.tensor(list(itertools.product([0, 1], repeat=n)), dtype=torch.bool)
    values = f(torch.where(masks, x, ref)).detach()
    index = {tuple(m.tolist()): v for m, v in zip(masks, values)}
    phi = torch.zeros(n, dtype=torch.float64)
    for m, v in index.items():
        k = sum(m)
        for i in range(n):
            if m[i]:
                continue
            with_i = list(m)
            with_i[i] = 1
            w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            phi[i] += w * (index[tuple(with_i)] - v)
    return phi


def proportions(a: torch.Tensor) -> torch.Tensor:
    return a / a.abs().sum().clamp_min(1e-300)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def run(games: int, n_range: tuple[int, int], coalitions: int, steps: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for g in range(games):
        n = int(torch.randint(n_range[0], n_range[1] + 1, (1,), generator=gen))
        f = (polynomial_game if g % 2 == 0 else tanh_game)(n, gen)
        x = (0.5 + torch.rand(1, n, generator=gen, dtype=torch.float64))
        ref = torch.zeros(n, dtype=torch.float64)
        phi = exact_shapley(f, x[0], ref)
        budget = coalitions * steps
        sig = tk.shapley_integrated_gradients(f, x, 0.0, coalitions=coalitions, steps=steps,
                                              seed=seed + g).attributions[0]
        ig = tk.integrated_gradients(f, x, 0.0, steps=budget).attributions[0]
        eg = tk.expected_gradients(f, x, ref[None], samples=budget,
                                   seed=seed + g).attributions[0]
        row = {"game": g, "family": "polynomial" if g % 2 == 0 else "tanh", "n": n}
        for name, a in (("sig", sig), ("ig", ig), ("eg", eg)):
            row[f"{name}_error"] = float((proportions(a) - proportions(phi)).abs().sum())
            row[f"{name}_spearman"] = spearman(a, phi)
        rows.append(row)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k.endswith(
        ("_error", "_spearman"))}
    return {"games": rows, "mean": mean, "settings": {
        "games": games, "n_range": n_range, "coalitions": coalitions, "steps": steps,
        "evaluations_per_method": coalitions * steps, "seed": seed}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--games", type=int, default=24, help="random games scored")
    p.add_argument("--n-min", type=int, default=4, help="fewest players of a game")
    p.add_argument("--n-max", type=int, default=10, help="most players of a game")
    p.add_argument("--coalitions", type=int, default=64,
                   help="SIG coalitions per input (IG and EG get coalitions x steps evaluations)")
    p.add_argument("--steps", type=int, default=16, help="path nodes per coalition")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--small", action="store_true", help="4 small games (smoke test)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    if a.small:
        a.games, a.n_min, a.n_max, a.coalitions, a.steps = 4, 3, 5, 16, 8
    if not 2 <= a.n_min <= a.n_max:
        p.error(f"need 2 <= --n-min <= --n-max, got {a.n_min} and {a.n_max}")
    res = run(a.games, (a.n_min, a.n_max), a.coalitions, a.steps, a.seed)
    print(f"{'game':>4} {'family':>10} {'n':>2} | {'SIG err':>8} {'IG err':>8} {'EG err':>8} |"
          f" {'SIG rho':>7} {'IG rho':>7} {'EG rho':>7}")
    for r in res["games"]:
        print(f"{r['game']:>4} {r['family']:>10} {r['n']:>2} | {r['sig_error']:8.4f} "
              f"{r['ig_error']:8.4f} {r['eg_error']:8.4f} | {r['sig_spearman']:7.3f} "
              f"{r['ig_spearman']:7.3f} {r['eg_spearman']:7.3f}")
    m = res["mean"]
    print(f"mean {'':>15} | {m['sig_error']:8.4f} {m['ig_error']:8.4f} {m['eg_error']:8.4f} | "
          f"{m['sig_spearman']:7.3f} {m['ig_spearman']:7.3f} {m['eg_spearman']:7.3f}")
    print(f"({res['settings']['evaluations_per_method']} evaluations per method and game; "
          f"error = L1 distance of attribution proportions to exact Shapley proportions)")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
