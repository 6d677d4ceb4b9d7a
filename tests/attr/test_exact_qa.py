"""rule='exact', from a QA pass (2026-12-03): an augmented assignment FX records as a new
value, Captum's multiply_by_inputs=False checked by completeness too, layouts the pair rules
do not follow, and fallback messages that name the real cause."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import taylor_kernels as tk
from taylor_kernels.captum import IntegratedGradients, LayerIntegratedGradients
from taylor_kernels.engine import exact_path


class Alias(nn.Module):
    """``r = h; h += bump(x)`` then ``r`` read: in place, ``r`` changes too; the bump is 0
    at both ends of the test's path, so the trace's check of the ends passes."""

    def __init__(self):
        super().__init__()
        self.l, self.o = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.l(x)
        r = h
        h += 3 * F.relu(0.3 - (x[:, :1] - 0.5).abs())
        return self.o(F.relu(r))


X = torch.tensor([[2.0, 1.0, -1.0]], dtype=torch.float64)
B = torch.tensor([[-1.0, 0.0, 0.5]], dtype=torch.float64)


def _messages(run) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught]


def _alias():
    torch.manual_seed(0)
    return Alias().double().eval()


def test_an_augmented_assignment_read_through_an_alias_falls_back():
    """FX records ``h += t`` as ``h2 = h + t``: the alias read the old value in the trace
    (Captum front, multiply_by_inputs=False, method='exact': 4x off, silently)."""
    said = _messages(lambda: IntegratedGradients(_alias(), multiply_by_inputs=False).attribute(
        X, B, target=1, method="exact"))
    assert any("rule='exact': in-place add" in m for m in said), said
    res = tk.integrated_gradients(_alias(), X, B, target=1, rule="exact")
    assert (res.regions == -1).all()


def test_unscaled_exact_sums_are_checked_by_completeness(monkeypatch):
    """multiply_by_inputs=False skipped the completeness check of exact sums (its sums lack
    the x - b factor): with the in-place detection off, the check now catches the trace that
    does not follow the model."""
    monkeypatch.setattr(exact_path, "mutated_then_read", lambda graph, root: None)
    said = _messages(lambda: IntegratedGradients(_alias(), multiply_by_inputs=False).attribute(
        X, B, target=1, method="exact"))
    assert any("exact sums miss completeness" in m for m in said), said


def test_unscaled_exact_sums_of_a_followed_trace_pass_the_check():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    said = _messages(lambda: IntegratedGradients(model, multiply_by_inputs=False).attribute(
        X, B, target=1, method="exact"))
    assert not said
    t = (torch.arange(400000, dtype=torch.float64) + 0.5) / 400000
    p = (B + t[:, None] * (X - B)).requires_grad_(True)
    (g,) = torch.autograd.grad(model(p)[:, 1].sum(), p)
    got = IntegratedGradients(model, multiply_by_inputs=False).attribute(X, B, target=1,
                                                                         method="exact")
    torch.testing.assert_close(got, g.mean(0, keepdim=True), rtol=0, atol=1e-6)


class SequenceFirst(nn.Module):
    """A residual stream kept as ``[T, N, C]`` beside ReLUs on ``[N, T, C]``."""

    def __init__(self, T=3, C=4):
        super().__init__()
        self.T, self.C = T, C
        self.l, self.o = nn.Linear(C, C), nn.Linear(T * C, 2)

    def forward(self, x):
        xt = self.l(x.view(x.shape[0], self.T, self.C)).transpose(0, 1)
        y = F.relu(xt.transpose(0, 1)).transpose(0, 1) + xt
        return self.o(F.relu(y.transpose(0, 1)).reshape(x.shape[0], -1))


def test_a_layout_the_pair_rules_do_not_follow_falls_back_instead_of_crashing():
    """A RuntimeError from the cached affine nodes (dim 0 read as the batch) crashed the call."""
    torch.manual_seed(15)
    model = SequenceFirst().double().eval()
    x, b = torch.randn(2, 12, dtype=torch.float64) * 2, torch.zeros(2, 12, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="first dimension is not the batch"):
        res = tk.integrated_gradients(model, x, b, target=1, rule="exact", tol=1e-3)
    ref = tk.integrated_gradients(model, x, b, target=1, rule="riemann_middle", steps=4000)
    torch.testing.assert_close(res.attributions, ref.attributions, rtol=0, atol=2e-2)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act, self.o = nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        return self.o(self.act(h) + h)


def test_fallback_messages_name_the_real_cause():
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    said = _messages(lambda: tk.integrated_gradients(InPlace().eval(), x, target=1,
                                                     rule="exact"))
    assert any("in-place act changes" in m for m in said), said  # (was "f.act")
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(seq)
    said = _messages(lambda: tk.integrated_gradients(scripted, x, target=1, rule="exact"))
    assert any("cannot trace a TorchScript model" in m for m in said), said
    said = _messages(lambda: LayerIntegratedGradients(seq, seq[1]).attribute(
        x, target=1, method="exact"))
    assert any("layer IG replaces the layer's output by a hook" in m for m in said), said


def test_tracing_a_module_with_a_backward_hook_prints_nothing():
    """torch warned 'For backward hooks to be called, module output should be a Tensor ...
    received Proxy' while torch.fx traced the model; the call itself is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 8)),
                          nn.Linear(8, 2)).eval()
    model[1].register_full_backward_hook(lambda m, gi, go: None)
    x = torch.randn(2, 4)
    assert _messages(lambda: tk.integrated_gradients(model, x, target=1, rule="exact")) == []


def test_unscaled_exact_falls_back_on_the_gap_with_its_factor():
    """multiply_by_inputs=False on a smooth model: the exact rule's fallback refined on a gap
    without the x - b factor (every input to 63 nodes, a false 'relative gap 2.2' warning)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 2)).double().eval()
    x, b = torch.randn(3, 4, dtype=torch.float64) * 2, torch.zeros(3, 4, dtype=torch.float64)
    ig = IntegratedGradients(model, multiply_by_inputs=False)
    said = _messages(lambda: ig.attribute(x, b, target=1, method="exact"))
    assert len(said) == 1 and "GELU is not piecewise-linear" in said[0], said
    assert int(ig.last_result.nodes_per_input.max()) < 63
    t = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    p = (b[:, None] + t[None, :, None] * (x - b)[:, None]).reshape(-1, 4).requires_grad_(True)
    (g,) = torch.autograd.grad(model(p)[:, 1].sum(), p)
    ref = g.reshape(3, -1, 4).mean(1)
    torch.testing.assert_close(ig.attribute(x, b, target=1, method="exact"), ref, rtol=0,
                               atol=1e-6)
