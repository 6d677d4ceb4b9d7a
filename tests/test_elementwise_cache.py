"""models/elementwise.py: activations whose derivative is computed once per forward give the
same gradients as autograd, over several backward passes of one graph, and leave no hooks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from taylor_kernels.models import elementwise

F64 = torch.float64


def _activations():
    acts = [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Tanh(), nn.Sigmoid(),
            nn.Mish(), nn.ELU(), nn.Softplus(), nn.Hardswish()]
    try:
        from transformers import activations as hf
        acts += [hf.NewGELUActivation(), hf.GELUActivation(), hf.FastGELUActivation(),
                 hf.QuickGELUActivation(), hf.SiLUActivation()]
    except ImportError:
        pass
    return acts


class Block(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(5, 7), act, nn.Linear(7, 3)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("act", _activations(), ids=lambda a: type(a).__name__)
def test_cached_derivative_equals_autograd_over_several_passes(act):
    torch.manual_seed(0)
    model = Block(act).to(F64)
    assert elementwise.is_elementwise(model.act)
    x = (3 * torch.randn(4, 5, dtype=F64)).requires_grad_()

    def grads():  # one graph, three backward passes (as a generation's serial passes)
        out = model(x)
        return [torch.autograd.grad(out[:, t].sum(), x, retain_graph=t < 2)[0]
                for t in range(3)]

    plain = grads()
    with elementwise.cached_derivatives(model):
        out = model(x)
        assert out.grad_fn.next_functions  # still a graph
        cached = grads()
        with torch.no_grad():
            torch.testing.assert_close(model(x), out.detach(), rtol=0, atol=0)
    for a, b in zip(cached, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not model.act._forward_hooks


class InPlaceAfter(Block):
    def forward(self, x):
        return self.down(self.act(self.up(x)).mul_(2))


def test_the_model_may_change_an_activation_output_in_place(used):
    """(Why ScaledGrad copies: a returned input would be a view autograd refuses to change.)"""
    torch.manual_seed(0)
    model = InPlaceAfter(nn.GELU()).to(F64)  # (tanh saves its output: no in-place)
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    plain = torch.autograd.grad(model(x).sum(), x)[0]
    with elementwise.cached_derivatives(model):
        cached = torch.autograd.grad(model(x).sum(), x)[0]
    assert used
    torch.testing.assert_close(cached, plain, rtol=1e-12, atol=1e-14)


@pytest.fixture
def used(monkeypatch):
    """A list that gets one entry per ScaledGrad.apply call."""
    calls = []
    apply = elementwise.ScaledGrad.apply
    monkeypatch.setattr(elementwise.ScaledGrad, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


def test_the_cache_is_used_and_hooked_or_unknown_modules_are_left_alone(used):
    model = Block(nn.GELU()).to(F64)
    x = torch.randn(2, 5, dtype=F64, requires_grad=True)
    with elementwise.cached_derivatives(model):
        model(x)
    assert used == [1]
    handle = model.act.register_forward_hook(lambda m, i, o: o * 2)  # not elementwise g any more
    try:
        assert not elementwise.is_elementwise(model.act)
        with elementwise.cached_derivatives(model):
            model(x)
    finally:
        handle.remove()
    assert used == [1]
    assert not elementwise.is_elementwise(nn.Softmax(dim=-1))  # not elementwise
    assert not elementwise.is_elementwise(nn.ReLU())  # nothing to save: its backward is one op


def test_nothing_is_routed_while_a_global_forward_hook_could_rewrite_outputs(used):
    model = Block(nn.Tanh()).to(F64)
    x = torch.randn(2, 5, dtype=F64, requires_grad=True)
    doubled = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: o * 2 if isinstance(m, nn.Tanh) else None)
    try:
        plain = torch.autograd.grad(model(x).sum(), x)[0]
        with elementwise.cached_derivatives(model):
            cached = torch.autograd.grad(model(x).sum(), x)[0]
    finally:
        doubled.remove()
    assert not used
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)
