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
