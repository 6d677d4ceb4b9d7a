"""Tests for mutants of the core modules that no test noticed (a mutation-testing pass,
2026-12-01): several baselines per input with per-row targets and forward arguments (the point's
row, the baselines' rows and the gap), the noise tunnel's copies (noise scale, per-input
targets, the gap), and the adaptive rule's default tolerance and its warning."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk

F64 = torch.float64


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).double().eval()


@pytest.mark.parametrize("shared", [False, True])
def test_several_baselines_with_per_row_targets_and_args(shared):
    """IG against K baselines is the mean of K single-baseline IGs, per-row targets and
    forward args following each point's input; the gap is ``sum(attr) - (f(x) - mean_k
    f(b_k))`` with each input's target."""
    model = _mlp()
    x = torch.randn(3, 4, dtype=F64)
    bl = torch.randn(1 if shared else 3, 2, 4, dtype=F64)
    target = torch.tensor([0, 1, 2])
    res = tk.integrated_gradients(model, x, bl, target, steps=16)
    single = sum(tk.integrated_gradients(model, x, bl[:, k], target, steps=16).attributions
                 for k in range(2)) / 2
    torch.testing.assert_close(res.attributions, single)
    rows = torch.arange(3)
    fb = torch.stack([model(bl.expand(3, 2, 4)[:, k])[rows, target] for k in range(2)], 1)
    gap = res.attributions.sum(1) - (model(x)[rows, target] - fb.mean(1))
    torch.testing.assert_close(res.gap, gap.detach())

    def scaled(z, scale):
        return (model(z) * scale).sum(1)

    scale = torch.tensor([[1.0], [-2.0], [3.0]], dtype=F64)
    multi = tk.integrated_gradients(scaled, x, bl, steps=16, additional_forward_args=(scale,))
    single = sum(tk.integrated_gradients(scaled, x, bl[:, k], steps=16,
                                         additional_forward_args=(scale,)).attributions
                 for k in range(2)) / 2
    torch.testing.assert_close(multi.attributions, single)


def test_noise_tunnel_copies_scale_targets_and_gap():
    """SmoothGrad over IG equals IG on hand-built noisy copies (noise ``stdevs``, not its
    square; a list target per input, repeated for its copies); the gap is the copies' mean."""
    model = _mlp()
    x = torch.randn(2, 4, dtype=F64)
    res = tk.noise_tunnel(tk.integrated_gradients, model, x, nt_samples=4, stdevs=0.5, seed=1,
                          target=[0, 2], steps=4)
    noise = torch.randn((8, 4), generator=torch.Generator().manual_seed(1), dtype=F64)
    copies = tk.integrated_gradients(model, x.repeat_interleave(4, 0) + 0.5 * noise,
                                     target=[0] * 4 + [2] * 4, steps=4)
    torch.testing.assert_close(res.attributions, copies.attributions.reshape(2, 4, 4).mean(1))
    torch.testing.assert_close(res.gap, copies.gap.reshape(2, 4).mean(1))


def test_adaptive_default_tolerance_and_its_warning():
    """Without ``tol`` the adaptive rule meets 1e-4 relative completeness, and warns (also
    without ``tol``) when 63 nodes cannot meet it."""
    model = _mlp()
    x = 3 * torch.randn(4, 4, dtype=F64)
    res = tk.integrated_gradients(model, x, target=1, rule="adaptive")
    delta = model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]
    assert (res.gap.abs() <= 1e-4 * delta.abs() + 1e-12).all()
    kinked = lambda z: (z.abs() - 0.3).abs().sum(1) * 1e3  # noqa: E731  (not smooth)
    with pytest.warns(RuntimeWarning):
        tk.integrated_gradients(kinked, torch.randn(2, 4, dtype=F64), rule="adaptive")


def test_adaptive_tolerance_is_relative_for_a_model_with_small_outputs():
    """The rounding floor of the stopping test must stay at rounding: a model whose outputs
    are ~1e-6 still meets a relative ``tol``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(),
                              torch.nn.Linear(32, 1)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3)
    model = lambda z: 1e-6 * net(z)  # noqa: E731
    x = 2 * torch.randn(6, 6, dtype=F64)
    res = tk.integrated_gradients(model, x, rule="adaptive", tol=1e-6)
    delta = (model(x) - model(torch.zeros_like(x))).squeeze(1).detach()
    assert (res.gap.abs() <= 1e-6 * delta.abs()).all()


def test_shapley_coalition_sizes_past_the_first_block():
    """Coalition sizes are ``floor(m n / M)`` for every input, also past the first sorted
    block of rows (a block of 16 rows is not a multiple of M = 12)."""
    from taylor_kernels.attr import shapley_ig
    present = shapley_ig.sample_coalitions(50, 1000, 12, torch.Generator().manual_seed(0))
    assert (present.sum(-1) == shapley_ig.coalition_sizes(1000, 12)).all()


def test_principle_departures_and_term_selection():
    from taylor_kernels.attr.unification import Term, principle_departures, select_terms
    terms = [Term((0,), 1.0), Term((1,), 0.5), Term((2,), 0.2), Term((0, 1), 0.8),
             Term((1, 2), 0.3), Term((0, 2), 0.1)]
    assert len(select_terms(terms, 2)) == 2
    # an independent term shared half outside its feature (P2: 1.0), an interaction shared half
    # outside its pair (P3: 1.0): no cancellation between signs, support counted
    w = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]], dtype=F64)
    assert principle_departures([Term((0,), 1.0), Term((0, 1), 1.0)], w) == \
        pytest.approx((1.0, 1.0))


def test_a_non_finite_gradient_names_its_node():
    class Kinked(torch.nn.Module):
        def forward(self, z):  # sqrt at 0: non-finite gradient at t = 1 only
            return torch.sqrt((z - 1).abs()).sum(1)

    with pytest.raises(FloatingPointError, match="alpha=1 "):
        tk.integrated_gradients(Kinked(), torch.ones(2, 3, dtype=F64),
                                torch.zeros(2, 3, dtype=F64), steps=5, rule="riemann_right")
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        tk.integrated_gradients(torch.nn.Linear(3, 1).double(), torch.randn(2, 3, dtype=F64),
                                steps=1, rule="trapezoid")


def test_out_of_memory_halves_a_two_point_chunk_to_one():
    lin = torch.nn.Linear(3, 1).double()

    def model(z):
        if z.shape[0] > 1 and torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return lin(z).squeeze(1)

    res = tk.integrated_gradients(model, torch.randn(2, 3, dtype=F64), steps=4, chunk_size=2)
    assert res.gap.abs().max() < 1e-12


def test_adaptive_rule_does_not_stop_on_errors_that_cancel():
    """``x0^3 - x1^3`` from 0 to (1, 1): the one-node level's (0.75, -0.75) has a zero gap;
    the features must agree between nested levels too (IG is (1, -1)). A siamese difference
    ``s(a) - s(b)`` at ``a == b`` (gap zero at every level) as well."""
    f = lambda z: z[:, 0] ** 3 - z[:, 1] ** 3  # noqa: E731
    res = tk.integrated_gradients(f, torch.ones(1, 2, dtype=F64), rule="adaptive", tol=1e-6)
    torch.testing.assert_close(res.attributions, torch.tensor([[1.0, -1.0]], dtype=F64))
    torch.manual_seed(0)
    s = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                            torch.nn.Linear(8, 1)).double()
    g = lambda z: (s(z[:, :3]) - s(z[:, 3:]))[:, 0]  # noqa: E731
    u = torch.randn(1, 3, dtype=F64)
    x = torch.cat([u, u], 1)
    got = tk.integrated_gradients(g, x, rule="adaptive", tol=1e-6).attributions
    want = tk.integrated_gradients(g, x, steps=64).attributions
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
