"""Differentiable attributions (create_graph=True): gradcheck / gradgradcheck in float64 of IG
and EG with respect to model parameters, on every CPU backend; the DAPr API."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import taylor_kernels as tk
from taylor_kernels import priors
from tests.attr.test_low_precision import one_thread  # noqa: F401  (autouse: 1 thread)


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (4,), (2, 4)]
    return tuple(torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
                 for s in shapes)


def _net(w1, b1, w2):
    return lambda x: torch.tanh(x @ w1.T + b1) @ w2.T


X = torch.tensor([[0.3, -1.2, 0.8], [1.1, 0.4, -0.5]], dtype=torch.float64)
BASE = torch.tensor([[0.1, 0.2, -0.3]], dtype=torch.float64)
TARGET = torch.tensor([1, 0])


def ig_of_params(*params, rule="gausslegendre"):
    """IG attributions [2, 3] as a function of the parameters (chunks of 3 points)."""
    return tk.integrated_gradients(_net(*params), X, BASE, TARGET, steps=4, rule=rule,
                                   chunk_size=3, create_graph=True).attributions


def eg_of_params(*params):
    """EG attributions with fixed draws (seed): a deterministic function of the parameters."""
    return tk.expected_gradients(_net(*params), X, BASE.expand(3, 3) + torch.arange(3.0)[:, None]
                                 .double(), TARGET, samples=3, seed=5, chunk_size=4,
                                 create_graph=True).attributions


def ig_of_inputs(x, rule="gausslegendre"):
    """IG attributions [2, 3] as a function of the inputs (the path points and the x - b
    factor both depend on them)."""
    return tk.integrated_gradients(_net(*[p.detach() for p in _params()]), x, BASE, TARGET,
                                   steps=4, rule=rule, chunk_size=3,
                                   create_graph=True).attributions


def eg_of_inputs(x):
    return tk.expected_gradients(_net(*[p.detach() for p in _params()]), x,
                                 BASE.expand(3, 3) + torch.arange(3.0)[:, None].double(), TARGET,
                                 samples=3, seed=5, chunk_size=4, create_graph=True).attributions


@pytest.mark.parametrize("fn", [ig_of_inputs, eg_of_inputs,
                                lambda x: ig_of_inputs(x, "adaptive")],
                         ids=["ig", "eg", "ig_adaptive"])
def test_gradcheck_in_the_inputs(fn):
    """create_graph attributions are differentiable in the inputs too (they were detached:
    no gradient reached x)."""
    assert gradcheck(fn, (X.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", [ig_of_params, eg_of_params], ids=["ig", "eg"])
def test_gradcheck(cpu_backend, fn):
    """Per backend, w.r.t. the last two parameters (the interpreted Triton kernels are slow;
    gradgradcheck below covers all parameters)."""
    w1, b1, w2 = _params()
    assert gradcheck(lambda b, w: fn(w1.detach(), b, w), (b1, w2), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", [ig_of_params, eg_of_params], ids=["ig", "eg"])
def test_gradgradcheck(fn):
    assert gradgradcheck(fn, _params(1), eps=1e-6, atol=1e-6)


def test_gradient_matches_autograd_of_closed_form():
    """A loss on IG attributions of f(x) = sum(w * x^2): IG_i = w_i (x_i^2 - b_i^2) exactly."""
    w = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64, requires_grad=True)
    attr = tk.integrated_gradients(lambda x: (w * x * x).sum(1), X, BASE, steps=3,
                                   create_graph=True).attributions
    (g,) = torch.autograd.grad(attr.pow(2).sum(), w)
    w2 = w.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad((w2 * (X**2 - BASE**2)).pow(2).sum(), w2)
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)


def test_without_create_graph_attributions_are_constants():
    attr = ig_of_params(*_params())
    assert attr.requires_grad
    plain = tk.integrated_gradients(_net(*_params()), X, BASE, TARGET, steps=4).attributions
    assert not plain.requires_grad
    torch.testing.assert_close(attr.detach(), plain, rtol=1e-12, atol=1e-12)


def test_dapr_penalty_gradient_matches_plain_autograd():
    """The DAPr loss through tk.expected_gradients equals a hand-written EG with the same
    draws, in value and in parameter gradients."""
    from taylor_kernels.benchmarks.cases_scale import plain_dapr_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 2)).double()
    prior = priors.PriorNet(2).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (7,))
    meta = priors.feature_metadata(x)
    ours, _ = priors.dapr_loss(model, prior, meta, x, y, x, lam=0.7, seed=11)
    ref = plain_dapr_loss(model, prior, meta, x, y, x, lam=0.7, seed=11)
    params = list(model.parameters()) + list(prior.parameters())
    g_ours = torch.autograd.grad(ours, params)
    g_ref = torch.autograd.grad(ref, params)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_priors_api_and_errors():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    torch.testing.assert_close(priors.feature_metadata(x), torch.tensor([[2.0, 3.0],
                                                                         [4.0, 6.0]]))
    phi = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    pen = priors.attribution_prior_penalty(phi, torch.tensor([1.0, 1.0]))
    assert pen.item() == pytest.approx((0 + 3 + 2 + 1) / 4)
    with pytest.raises(ValueError, match="prior"):
        priors.attribution_prior_penalty(phi, torch.ones(3))
    with pytest.raises(ValueError, match="N >= 2"):
        priors.feature_metadata(torch.ones(1, 3))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="prior_net"):
        priors.fit(model, (x, torch.tensor([0, 1, 0])), (x, torch.tensor([0, 1, 0])), lam=1.0)
    with pytest.raises(ValueError, match="train must hold"):  # (an UnboundLocalError)
        priors.fit(model, (x[:0], torch.tensor([], dtype=torch.long)),
                   (x, torch.tensor([0, 1, 0])), epochs=1)
    with pytest.raises(ValueError, match="val must hold"):
        priors.fit(model, (x, torch.tensor([0, 1, 0])), (x, torch.tensor([0, 1])), epochs=1)
    meta, prior = priors.feature_metadata(x), torch.nn.Linear(2, 1)
    before = copy.deepcopy(model.state_dict())
    for lam in (float("nan"), float("inf"), -1.0):  # NaN made the weights NaN, then failed
        with pytest.raises(ValueError, match="lam must be a finite number"):
            priors.fit(model, (x, torch.tensor([0, 1, 0])), (x, torch.tensor([0, 1, 0])),
                       prior_net=prior, meta=meta, lam=lam, epochs=1)
        with pytest.raises(ValueError, match="lam must be a finite number"):  # (-1 ran)
            priors.dapr_loss(model, prior, meta, x, torch.tensor([0, 1, 0]), x, lam)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_fit_restores_the_best_states_when_training_fails():
    """A non-finite loss (lr far too high) stops with a clear error and the model keeps its
    best (here: its starting) weights, not NaN ones."""
    torch.manual_seed(0)
    x = torch.randn(16, 2)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(2, 2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        priors.fit(model, (x * 1e30, y), (x, y), lr=1e30, epochs=3, batch_size=4)
    for v in model.state_dict().values():
        assert torch.isfinite(v).all()


def test_fit_learns_and_restores_best_state():
    """Joint training on a separable task reaches high validation accuracy; the returned model
    is the best epoch's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    prior = priors.PriorNet(2)
    held = torch.ones_like(model[0].weight)  # a caller's own .grad comes back as it was
    model[0].weight.grad = held
    res = priors.fit(model, (x[:40], y[:40]), (x[40:], y[40:]), prior_net=prior,
                     meta=priors.feature_metadata(x[:40]), lam=0.5, epochs=20, lr=1e-2,
                     patience=10, batch_size=20)
    assert res.best_val_accuracy >= 0.9
    assert priors.accuracy(model, x[40:], y[40:]) == pytest.approx(res.best_val_accuracy)
    assert all(h["penalty"] > 0 for h in res.history)
    # the caller's .grad as before the call (zero_grad had left the last batch's)
    assert model[0].weight.grad is held and torch.equal(held, torch.ones_like(held))
    assert all(p.grad is None for net in (model[2], prior) for p in net.parameters())


def test_accuracy_is_measured_in_eval_mode_and_modes_are_kept():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.9), nn.Linear(16, 2))
    x, y = torch.randn(40, 6), torch.randint(0, 2, (40,))
    first = priors.accuracy(model, x, y)
    assert model.training and model[2].training  # restored
    assert priors.accuracy(model, x, y) == first == priors.accuracy(model.eval(), x, y)


def test_fit_trains_a_model_with_dropout_and_batch_norm_and_checks_its_arguments():
    """A model trains in train mode; with lam > 0 the attribution prior was refused at the
    first step (dropout, batch norm); epochs=0 returned accuracy -1, batch_size=0 failed in
    range()."""
    torch.manual_seed(0)
    X = torch.randn(40, 5, dtype=torch.float64)
    y = (X[:, 0] + X[:, 1] > 0).long()
    meta = priors.feature_metadata(X)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Dropout(0.2), torch.nn.Tanh(),
                                torch.nn.Linear(8, 2)).double()
    before = model[1].num_batches_tracked.clone()
    res = priors.fit(model, (X, y), (X, y), prior_net=priors.PriorNet(2).double(), meta=meta,
                     lam=0.5, epochs=2, batch_size=20)
    assert res.history and all(torch.isfinite(torch.tensor(h["penalty"])) for h in res.history)
    assert model[1].num_batches_tracked > before  # the loss forwards trained batch norm
    import numpy as np
    priors.fit(model, (X, y), (X, y), epochs=np.int64(1), batch_size=np.int64(20))
    for bad in ({"epochs": 0}, {"batch_size": 0}, {"epochs": 2.5}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            priors.fit(model, (X, y), (X, y), **bad)


def test_create_graph_under_a_budget_counts_the_graphs_it_keeps():
    """Every chunk's graph stays alive for the caller's backward, so chunks do not bound the
    call: a budget that cannot hold the kept graphs raises ``MemoryError`` (a CNN's IG kept
    240 MB under 8 MB); one that can gives the unbudgeted numbers and gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Tanh(),
                                torch.nn.Linear(512, 512), torch.nn.Tanh(),
                                torch.nn.Linear(512, 3))
    x = torch.randn(8, 64)

    def attr(**kw):
        return tk.integrated_gradients(model, x, target=1, steps=64, create_graph=True,
                                       **kw).attributions

    with pytest.raises(MemoryError, match="create_graph=True keeps"):
        attr(max_memory="4MB")  # 512 points keep over 8 KB of activations each
    free, held = attr(), attr(max_memory="256MB")
    torch.testing.assert_close(held, free)
    g_free = torch.autograd.grad(free.square().sum(), model[0].weight)[0]
    g_held = torch.autograd.grad(held.square().sum(), model[0].weight)[0]
    torch.testing.assert_close(g_held, g_free)


def test_fit_history_averages_each_epochs_batches(monkeypatch):
    """``history`` holds each epoch's mean loss terms over its batches (it held the last
    batch's)."""
    torch.manual_seed(0)
    x = torch.randn(10, 2)
    y = (x[:, 0] > 0).long()
    seen = []
    real = priors.dapr_loss

    def recording(model, prior_net, meta, xb, *args, **kwargs):
        loss, parts = real(model, prior_net, meta, xb, *args, **kwargs)
        seen.append((xb.shape[0], parts["ce"]))
        return loss, parts

    monkeypatch.setattr(priors, "dapr_loss", recording)
    res = priors.fit(torch.nn.Linear(2, 2), (x, y), (x, y), epochs=1, batch_size=4)
    assert [n for n, _ in seen] == [4, 4, 2]
    assert res.history[0]["ce"] == pytest.approx(sum(n * ce for n, ce in seen) / 10)


def test_fit_checks_patience_runs_under_no_grad_and_keeps_two_rows_per_batch():
    """patience -1, 2.5 and NaN were taken (NaN turned early stopping off); under the
    caller's no_grad, fit failed with autograd's 'does not require grad'; a last batch of
    one row made batch norm raise; dapr_loss without meta raised an AttributeError."""
    torch.manual_seed(0)
    x = torch.randn(40, 3)
    y = (x[:, 0] > 0).long()
    meta = priors.feature_metadata(x)

    def net():
        return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8),
                                   torch.nn.ReLU(), torch.nn.Linear(8, 2))

    for patience in (-1, 2.5, float("nan")):
        with pytest.raises(ValueError, match="patience"):
            priors.fit(net(), (x, y), (x, y), patience=patience, epochs=2)
    with torch.no_grad():
        res = priors.fit(net(), (x, y), (x, y), epochs=1)
        assert not torch.is_grad_enabled()  # (the caller's mode, back after the call)
    assert len(res.history) == 1
    priors.fit(net(), (x, y), (x, y), prior_net=priors.PriorNet(), meta=meta, lam=0.5,
               epochs=1, batch_size=39)  # (40 rows: batches of 39 and 1 before)
    with pytest.raises(ValueError, match="meta-data"):
        priors.dapr_loss(net(), priors.PriorNet(), None, x[:4], y[:4], x, 1.0)
