"""Layer IG on a layer called more than once in forward: every call attributed on its own path,
the gap taken against the model's own f(x) - f(b); compared with Captum where it handles it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import taylor_kernels as tk
from taylor_kernels.attr.layer import _activation

captum_attr = pytest.importorskip("captum.attr")


class Twice(nn.Module):
    """``shared``: the layer sees the same input twice; ``nested``: ``l(l(x))``; ``shapes``:
    a parameter-free layer called on inputs of different widths."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.l = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.h = nn.Linear(4, 2)
        self.g = nn.Linear(4, 2)

    def forward(self, x):
        if self.kind == "shared":
            return self.h(torch.tanh(self.l(x)) * torch.sin(self.l(x)))
        if self.kind == "nested":
            return self.h(torch.tanh(self.l(torch.tanh(self.l(x)))))
        return torch.tanh(self.h(self.act(x))) + self.act(self.g(x)) ** 2  # [B, 4], [B, 2]


def _model(kind):
    torch.manual_seed(0)
    return Twice(kind).double()


def _delta(model, x, target):
    with torch.no_grad():
        return (model(x) - model(torch.zeros_like(x)))[:, target]


@pytest.mark.parametrize("kind", ["shared", "nested"])
def test_every_call_attributed_and_matches_captum(kind):
    model = _model(kind)
    x = torch.randn(3, 4, dtype=torch.float64)
    res = tk.layer_integrated_gradients(model, model.l, x, target=1, steps=64)
    assert isinstance(res.attributions, tuple) and len(res.attributions) == 2
    total = res.attributions[0] + res.attributions[1]
    ref = captum_attr.LayerIntegratedGradients(model, model.l).attribute(
        x, target=1, n_steps=64, method="gausslegendre")
    torch.testing.assert_close(total, ref, rtol=1e-7, atol=1e-9)
    delta = _delta(model, x, 1)
    torch.testing.assert_close(total.sum(1), delta, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(res.gap, total.sum(1) - delta, rtol=0, atol=1e-12)
    if kind == "nested":  # the first call's output only feeds the second, which is replaced
        assert res.attributions[0].abs().max() == 0


def test_calls_with_different_shapes_and_a_coarse_rule():
    model = _model("shapes")
    x = torch.randn(2, 4, dtype=torch.float64)
    res = tk.layer_integrated_gradients(model, model.act, x, target=0, steps=2,
                                        rule="riemann_left")
    shapes = [tuple(a.shape) for a in res.attributions]
    assert shapes == [(2, 4), (2, 2)]
    total = sum(a.sum(1) for a in res.attributions)
    # a 2-point left rule misses completeness: the gap must say so, against f(x) - f(b)
    gap = total - _delta(model, x, 0)
    torch.testing.assert_close(res.gap, gap, rtol=0, atol=1e-12)
    assert gap.abs().max() > 1e-4


def test_single_call_stays_a_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    res = tk.layer_integrated_gradients(model, model[1], x, target=1, steps=32)
    assert isinstance(res.attributions, torch.Tensor) and res.attributions.shape == (2, 5)
    assert res.gap.abs().max() < 1e-6


def test_call_count_differs_between_inputs_and_baselines():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            h = self.l(x)
            return (self.l(h) if bool(x.abs().sum() > 0) else h).sum(1)

    model = Branchy().double()
    with pytest.raises(ValueError, match="mixes rows"):  # the baseline alone: one call
        tk.layer_integrated_gradients(model, model.l, torch.ones(1, 3, dtype=torch.float64))
    with tk.allow_row_coupling(model):  # inputs and baselines apart, as Captum's
        with pytest.raises(ValueError, match="2 times at the inputs but 1 times at the "
                                             "baselines"):
            tk.layer_integrated_gradients(model, model.l, torch.ones(1, 3, dtype=torch.float64))


def test_methods_needing_one_call_say_so():
    model = _model("shared")
    with pytest.raises(ValueError, match="called 2 times in one forward"):
        _activation(model, model.l, (torch.randn(2, 4, dtype=torch.float64),), (), False)


class _TakesCache(torch.nn.Module):
    """A layer called as ``layer(x, cache)``, as transformers blocks may be."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()

    def forward(self, x, cache):
        return self.lin(x)


def test_non_tensor_layer_inputs_are_named_in_the_error():
    import taylor_kernels.captum as tkc
    layer = _TakesCache()
    model = lambda x: layer(x, object()).sum(1)  # noqa: E731
    lig = tkc.LayerIntegratedGradients(model, layer)
    with pytest.raises(ValueError, match=r"got tuple of \(Tensor, object\)"):
        lig.attribute(torch.ones(2, 3, dtype=torch.float64), attribute_to_layer_input=True)


@pytest.mark.parametrize("front", [False, True])
def test_layer_methods_after_other_calls_on_a_compiled_model(front):
    """Graphs dynamo compiled for IG's forwards ignore a layer hook added later (it does not
    guard on hooks by default): layer IG then found the layer "not called". Hook-based
    methods run a compiled module's original module."""
    import taylor_kernels.captum as tkc
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3)).double().eval()
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(3, 4, dtype=torch.float64)
    if front:
        tkc.IntegratedGradients(compiled).attribute(x, target=1, n_steps=8)
        got = tkc.LayerIntegratedGradients(compiled, net[1]).attribute(x, target=1, n_steps=8)
        want = tkc.LayerIntegratedGradients(net, net[1]).attribute(x, target=1, n_steps=8)
    else:
        tk.integrated_gradients(compiled, x, target=1, steps=8)
        got = tk.layer_integrated_gradients(compiled, net[1], x, target=1, steps=8).attributions
        want = tk.layer_integrated_gradients(net, net[1], x, target=1, steps=8).attributions
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
