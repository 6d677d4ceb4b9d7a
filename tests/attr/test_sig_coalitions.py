"""SIG on a non-additive game equals IG averaged over the coalition baselines it should build.

On an additive game every coalition baseline gives the same IG, so a bug in *which* features a
coalition keeps (e.g. present and absent swapped) is invisible there. Here the game has pairwise
and three-way interactions, and the expected value is rebuilt independently: the coalitions come
from :func:`sample_coalitions` with the same seed, a present feature (group) takes the input's
value and an absent one the reference, and each path integral is a float64 Gauss-Legendre sum of
autograd gradients written out in the test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import taylor_kernels as tk
from taylor_kernels.attr.shapley_ig import sample_coalitions

DT = torch.float64


def game(z):
    """``z0 z1 + 2 z1 z2 z3 + sin(z0 + z4) - z2 z4``: interactions of orders two and three."""
    return (z[:, 0] * z[:, 1] + 2 * z[:, 1] * z[:, 2] * z[:, 3] + torch.sin(z[:, 0] + z[:, 4])
            - z[:, 2] * z[:, 4])


def ig_by_hand(f, x, b, steps):
    """``(x - b) * sum_s w_s grad f(b + t_s (x - b))`` with Gauss-Legendre nodes on [0, 1]."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    total = torch.zeros_like(x)
    for t, w in zip((nodes + 1) / 2, weights / 2):
        p = (b + float(t) * (x - b)).requires_grad_(True)
        (g,) = torch.autograd.grad(f(p).sum(), p)
        total += float(w) * g
    return (x - b) * total


@pytest.mark.parametrize("grouped", [False, True], ids=["features", "groups"])
@pytest.mark.parametrize("seed", [0, 7])
def test_sig_equals_ig_over_its_coalition_baselines(seed, grouped):
    B, D, M, steps = 3, 5, 6, 12
    x = torch.randn(B, D, dtype=DT) + 1.0
    ref = torch.full((D,), -0.5, dtype=DT)
    groups = torch.tensor([0, 1, 1, 2, 0]) if grouped else torch.arange(D)
    n = int(groups.max()) + 1
    got = tk.shapley_integrated_gradients(
        game, x, ref, coalitions=M, seed=seed, steps=steps,
        feature_mask=groups if grouped else None).attributions

    present = sample_coalitions(B, n, M, torch.Generator().manual_seed(seed))  # [B, M, n]
    want = torch.zeros_like(x)
    for m in range(M):
        keep = present[:, m, groups]                       # [B, D]: feature in the coalition
        baseline = torch.where(keep, x, ref.expand_as(x))  # present: input; absent: reference
        want += ig_by_hand(game, x, baseline, steps) / M
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_coalition_choice_matters_on_this_game():
    """Guard against a vacuous test: swapping present and absent changes the answer here."""
    B, D, M, steps = 3, 5, 6, 12
    x = torch.randn(B, D, dtype=DT) + 1.0
    ref = torch.full((D,), -0.5, dtype=DT)
    present = sample_coalitions(B, D, M, torch.Generator().manual_seed(0))
    right = sum(ig_by_hand(game, x, torch.where(present[:, m], x, ref.expand_as(x)), steps)
                for m in range(M))
    swapped = sum(ig_by_hand(game, x, torch.where(present[:, m], ref.expand_as(x), x), steps)
                  for m in range(M))
    assert (right - swapped).abs().max() > 1e-2


def test_argument_errors_come_before_the_global_rng_moves():
    """With ``seed=None`` a seed is drawn from the global RNG: a bad rule (SIG) or
    ``create_graph`` with the exact rule (EG) raised only after that draw."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 2)).eval()
    x = torch.randn(2, 4)
    for call, match in [
            (lambda: tk.shapley_integrated_gradients(model, x, target=1, rule="bogus"),
             "unknown quadrature rule"),
            (lambda: tk.expected_gradients(model, x, torch.zeros(1, 4), target=1, samples=2,
                                           rule="exact", create_graph=True), "create_graph")]:
        state = torch.get_rng_state()
        with pytest.raises(ValueError, match=match):
            call()
        assert torch.equal(torch.get_rng_state(), state)
