"""DAPr and differentiable attributions, from a QA pass (2026-12-03): fused attention under
``create_graph``, references that carry a graph, train mode in ``fit``, labels and error
messages, model outputs that are ``ModelOutput``-like mappings."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import taylor_kernels as tk
from taylor_kernels import priors
from taylor_kernels.benchmarks.cases_scale import plain_dapr_loss
from tests.attr.test_low_precision import one_thread  # noqa: F401  (autouse: 1 thread)

T, E = 4, 8


class Attention(nn.Module):
    """One self-attention block through ``F.scaled_dot_product_attention`` (the fused CPU
    kernel has no second derivative) and a linear head: ``[B, T*E] -> [B, 2]``."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(E, 3 * E), nn.Linear(T * E, 2)

    def forward(self, x):
        h = x.view(x.shape[0], T, E)
        q, k, v = self.qkv(h).chunk(3, -1)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return self.out((h + a).flatten(1))


def test_create_graph_through_fused_attention_matches_the_math_kernel():
    """The double backward of a DAPr loss on an SDPA model failed inside torch ('derivative
    for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented'):
    the create_graph forwards now record the math kernels; the gradients equal the loss
    written by hand under the math backend."""
    torch.manual_seed(0)
    model, prior = Attention(), priors.PriorNet()
    X = torch.randn(12, T * E)
    y = (X[:, 0] > 0).long()
    meta = priors.feature_metadata(X)
    params = list(model.parameters()) + list(prior.parameters())
    ours, _ = priors.dapr_loss(model, prior, meta, X[:6], y[:6], X, 1.0, seed=3)
    g_ours = torch.autograd.grad(ours, params)
    with sdpa_kernel(SDPBackend.MATH):
        ref = plain_dapr_loss(model, prior, meta, X[:6], y[:6], X, 1.0, seed=3)
        g_ref = torch.autograd.grad(ref, params)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    attr = tk.integrated_gradients(model, X[:3], target=y[:3], steps=4,
                                   create_graph=True).attributions
    (g,) = torch.autograd.grad(attr.square().sum(), model.qkv.weight)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_references_that_carry_a_graph_are_differentiated_too():
    """An MLP over a trainable embedding, inputs and background both embedded: the penalty's
    gradient for the embedding missed the references' part (16% of its norm), silently."""
    torch.manual_seed(0)
    emb = nn.Embedding(20, 4).double()
    mlp = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    ids, y = torch.randint(0, 20, (12, 3)), torch.randint(0, 2, (12,))
    meta, prior = torch.randn(12, 2, dtype=torch.float64), priors.PriorNet().double()

    def embed(i):
        return emb(i).reshape(i.shape[0], -1)

    ours, _ = priors.dapr_loss(mlp, prior, meta, embed(ids[:4]), y[:4], embed(ids), 1.0,
                               seed=5)
    ref = plain_dapr_loss(mlp, prior, meta, embed(ids[:4]), y[:4], embed(ids), 1.0, seed=5)
    (g_ours,), (g_ref,) = (torch.autograd.grad(v, emb.weight) for v in (ours, ref))
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


def test_ig_baselines_with_a_graph_differentiated_only_under_create_graph():
    """IG baselines that require grad: with create_graph the attributions are differentiable
    in them (float64 Gauss-Legendre written by hand); without it the attributions are
    constants, as they are for inputs that require grad (a partial graph through the
    ``x - b`` factor was kept before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    plain = tk.integrated_gradients(model, x, baselines=(w * 0.5).expand(3, 4), target=0,
                                    steps=8).attributions
    assert not plain.requires_grad
    attr = tk.integrated_gradients(model, x, baselines=(w * 0.5).expand(3, 4), target=0,
                                   steps=8, create_graph=True).attributions
    (g_ours,) = torch.autograd.grad(attr.sum(), w)
    nodes, weights = _gauss_legendre(8)
    b = (w * 0.5).expand(3, 4)
    total = 0
    for a, wt in zip(nodes.tolist(), weights.tolist()):
        p = b + a * (x - b)
        (g,) = torch.autograd.grad(model(p)[:, 0].sum(), p, create_graph=True)
        total = total + wt * g
    (g_ref,) = torch.autograd.grad(((x - b) * total).sum(), w)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


def _gauss_legendre(n: int):
    import numpy as np
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)


def test_fit_trains_in_train_mode_and_restores_the_modes():
    """A model handed over in eval mode was trained with dropout off and batch norm frozen."""
    torch.manual_seed(0)
    X = torch.randn(40, 5)
    y = (X[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).eval()
    prior = priors.PriorNet().eval()
    before = model[1].running_mean.clone()
    priors.fit(model, (X, y), (X, y), prior_net=prior, meta=priors.feature_metadata(X),
               lam=0.5, epochs=1, batch_size=10)
    assert int(model[1].num_batches_tracked) == 4
    assert not torch.equal(model[1].running_mean, before)
    assert not model.training and not model[1].training and not prior.training


@pytest.mark.parametrize("labels", [lambda y: y[:, None], lambda y: y[:1], lambda y: y.float()])
def test_labels_must_be_one_integer_class_per_row(labels):
    """``y [N, 1]`` broadcast against ``[N]`` predictions: a perfect model scored 0.503, and
    fit's early stopping ran on that number."""
    torch.manual_seed(0)
    X = torch.randn(30, 3)
    y = (X[:, 0] > 0).long()
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"integer class labels \[N\]"):
        priors.accuracy(model, X, labels(y))
    with pytest.raises(ValueError, match=r"val (y must be integer class labels|must hold)"):
        priors.fit(model, (X, y), (X, labels(y)), epochs=1)


def test_fit_checks_its_data_and_meta_before_training():
    torch.manual_seed(0)
    X = torch.randn(32, 4)
    y = (X[:, 0] > 0).long()
    calls = []
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model.register_forward_hook(lambda *a: calls.append(1))
    bad = X.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="train X holds NaN"):
        priors.fit(model, (bad, y), (X, y), epochs=1)
    with pytest.raises(ValueError, match=r"val X has rows of shape \(5,\)"):
        priors.fit(model, (X, y), (torch.randn(8, 5), y[:8]), epochs=1)
    with pytest.raises(ValueError, match=r"PriorNet\(meta_dim=3\)"):
        priors.fit(model, (X, y), (X, y), prior_net=priors.PriorNet(), meta=torch.randn(4, 3),
                   lam=1.0, epochs=1)
    with pytest.raises(ValueError, match=r"meta must be \[D, M\] with D = 4"):
        priors.fit(model, (X, y), (X, y), prior_net=priors.PriorNet(), meta=torch.randn(5, 2),
                   lam=1.0, epochs=1)
    assert not calls  # (no epoch ran before the errors)


def test_dapr_reads_the_logits_of_a_model_output():
    """A model returning a ``ModelOutput``-like mapping: expected_gradients read its logits,
    dapr_loss and accuracy called cross_entropy / argmax on the mapping (TypeError)."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 2)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return {"logits": self.linear(x)}

    X = torch.randn(10, 4)
    y = (X[:, 0] > 0).long()
    meta, prior = priors.feature_metadata(X), priors.PriorNet()
    ours, _ = priors.dapr_loss(Wrapped(), prior, meta, X, y, X, 1.0, seed=2)
    ref, _ = priors.dapr_loss(linear, prior, meta, X, y, X, 1.0, seed=2)
    torch.testing.assert_close(ours, ref)
    assert priors.accuracy(Wrapped(), X, y) == priors.accuracy(linear, X, y)
