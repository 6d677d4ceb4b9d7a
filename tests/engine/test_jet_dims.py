"""Jet rules that take a ``normalized_shape`` or ``dim``: every such rule on shapes where the
last dimension alone is the wrong answer, against nested ``torch.func.jvp`` at orders 2-4.

Each case feeds ``[B, 3, 4]`` (or ``[B, 2, 3, 4]``) activations through the op with a non-last
or multi-dimensional ``dim``/``normalized_shape``, then a nonlinearity and a sum to one scalar per
row, so a rule that normalises, reduces, concatenates or splits over the wrong axes changes the
coefficients.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import taylor_kernels as tk
from taylor_kernels.reference.jet import nested_jvp_coefficients

DT = torch.float64


def composite_layer_norm(z, dims, weight, bias, eps=1e-5):
    """LayerNorm over ``dims`` by its formula (torch's nested jvp through F.layer_norm is wrong
    beyond first order, so the reference spells it out)."""
    c = z - z.mean(dims, keepdim=True)
    return c * torch.rsqrt((c * c).mean(dims, keepdim=True) + eps) * weight + bias


def reference(f, x, V, order):
    """``[order+1, B, M]`` coefficients of ``t -> f(x + t v)`` by nested forward-mode AD."""
    B, M = V.shape[:2]
    x0 = x.unsqueeze(1).expand(V.shape).reshape((B * M,) + x.shape[1:])
    c = nested_jvp_coefficients(f, [torch.stack([x0, V.reshape(x0.shape)])], order)
    return c.reshape(order + 1, B, M)


def scalar(y):
    """A nonlinear scalar per row: ``sum(tanh(y) * y)`` over every non-batch dim."""
    return (torch.tanh(y) * y).flatten(1).sum(1)


class Norm2d(nn.Module):
    """``nn.LayerNorm((3, 4))`` with random affine parameters on ``[B, 3, 4]``."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm((3, 4)).double()
        nn.init.normal_(self.ln.weight)
        nn.init.normal_(self.ln.bias)

    def forward(self, x):
        return scalar(self.ln(x))

    def ref(self, x):
        return scalar(composite_layer_norm(x, (-2, -1), self.ln.weight, self.ln.bias))


def _functional_layer_norm():
    w, b = torch.randn(3, 4, dtype=DT), torch.randn(3, 4, dtype=DT)
    return (lambda x: scalar(F.layer_norm(x, (3, 4), w, b)),
            lambda x: scalar(composite_layer_norm(x, (-2, -1), w, b)))


def _layer_norm_4d():
    ln = nn.LayerNorm((3, 4)).double()
    nn.init.normal_(ln.weight)
    return (lambda x: scalar(ln(x.reshape(x.shape[0], 2, 3, 4))),
            lambda x: scalar(composite_layer_norm(x.reshape(x.shape[0], 2, 3, 4), (-2, -1),
                                                  ln.weight, ln.bias)))


def _same(f):
    return f, f


CASES = {
    "layernorm_module_3x4": lambda: (Norm2d(), None),
    "layer_norm_functional_3x4": _functional_layer_norm,
    "layernorm_3x4_on_4d": _layer_norm_4d,
    "softmax_module_dim1": lambda: _same(lambda x: scalar(nn.Softmax(dim=1)(x))),
    "softmax_dim_minus2": lambda: _same(lambda x: scalar(F.softmax(x, dim=-2))),
    "log_softmax_dim1": lambda: _same(lambda x: scalar(torch.log_softmax(x, 1))),
    "method_softmax_dim1": lambda: _same(lambda x: scalar(x.softmax(1) + x.log_softmax(dim=1))),
    "sum_mean_dims": lambda: _same(
        lambda x: scalar(torch.tanh(x.sum(dim=1)) * x.mean(dim=(1, 2), keepdim=True)[:, 0])),
    "sum_function_dim": lambda: _same(lambda x: scalar(torch.sum(x, 1) * torch.mean(x, -2))),
    "cat_stack_dims": lambda: _same(
        lambda x: scalar(torch.cat([x, x * x], dim=1)) + scalar(torch.stack([x, -x], dim=2))),
    "split_chunk_narrow_dims": lambda: _same(
        lambda x: scalar(torch.split(x, [1, 2], dim=1)[1] * torch.narrow(x, 1, 0, 2))
        + scalar(torch.cat(x.chunk(2, dim=2)[::-1], dim=2) * x)),
    "transpose_movedim_flatten": lambda: _same(
        lambda x: scalar(torch.tanh(x.transpose(1, 2)) @ x)
        + scalar(torch.movedim(x, 1, 2).flatten(start_dim=1)[:, :5])),
}


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("name", CASES)
def test_dim_rule_matches_nested_jvp(name, order):
    f, ref_f = CASES[name]()
    ref_f = ref_f or f.ref
    x = torch.randn(2, 3, 4, dtype=DT) if name != "layernorm_3x4_on_4d" \
        else torch.randn(2, 24, dtype=DT)
    V = torch.randn((2, 2) + x.shape[1:], dtype=DT)
    got = tk.jet(f, x, V, order, cache=False)
    torch.testing.assert_close(got, reference(ref_f, x, V, order), rtol=1e-10, atol=1e-10)
