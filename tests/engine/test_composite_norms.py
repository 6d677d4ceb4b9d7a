"""Third-order and nested forward-mode derivatives through layer / instance norm: PyTorch's
own formulas are wrong there (torch 2.13: 35-85% off), so those paths run the norms as
composite ops (engine/composite_norms.py). References: the same nets with the norm written
out by hand, float64 (autograd composes those exactly)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import taylor_kernels as tk
from taylor_kernels.engine.composite_norms import composite_norms

F64 = torch.float64


class HandNorm(nn.Module):
    """``nn.LayerNorm`` (or ``nn.InstanceNorm1d(affine=True)``) written out."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, z):
        dims = (-1,) if isinstance(self.norm, nn.LayerNorm) else (2,)
        c = z - z.mean(dims, keepdim=True)
        y = c / torch.sqrt((c * c).mean(dims, keepdim=True) + self.norm.eps)
        if isinstance(self.norm, nn.LayerNorm):
            return y * self.norm.weight + self.norm.bias
        return y * self.norm.weight[:, None] + self.norm.bias[:, None]


def _nets(kind: str):
    torch.manual_seed(0)
    if kind == "layer":
        norm = nn.LayerNorm(6)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        body = [nn.Linear(4, 6), norm, nn.Tanh(), nn.Linear(6, 1)]
        hand = [body[0], HandNorm(norm), body[2], body[3]]
        return nn.Sequential(*body).to(F64).eval(), nn.Sequential(*hand).to(F64).eval()
    norm = nn.InstanceNorm1d(2, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    lin, out = nn.Linear(4, 6), nn.Linear(6, 1)

    def make(n):
        return nn.Sequential(lin, nn.Unflatten(1, (2, 3)), n, nn.Flatten(), nn.Tanh(), out)
    return make(norm).to(F64).eval(), make(HandNorm(norm)).to(F64).eval()


@pytest.mark.parametrize("kind", ["layer", "instance"])
def test_third_order_interactions_and_jet_fallback_through_norms(kind):
    net, hand = _nets(kind)
    x, u, v = (torch.randn(3, 4, dtype=F64) for _ in range(3))

    def f(m):
        return lambda z: m(z)[:, 0]

    torch.testing.assert_close(tk.third_order(f(net), x, u, v), tk.third_order(f(hand), x, u, v),
                               rtol=1e-9, atol=1e-12)
    for order, sets in ((2, [(0, 1), (2, 3)]), (3, [(0, 1, 2), (1, 1, 3)])):
        torch.testing.assert_close(
            tk.interactions(net, x, target=0, order=order, sets=sets).derivatives,
            tk.interactions(hand, x, target=0, order=order, sets=sets).derivatives,
            rtol=1e-9, atol=1e-12)
    got = tk.jet(f(net), x, v, 3, fallback=True)
    ref = tk.jet(f(hand), x, v, 3, fallback=True)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_composite_norms_equal_the_fused_ones_in_value():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    w, b = torch.randn(5, dtype=torch.bfloat16), torch.randn(5, dtype=torch.bfloat16)
    with composite_norms():
        ln = F.layer_norm(x, (5,), w, b)
        ln_all = torch.layer_norm(x.float(), (3, 5), None, None, 1e-5, True)
        inorm = F.instance_norm(x.float(), weight=w[:3].float(), bias=b[:3].float())
    torch.testing.assert_close(ln, F.layer_norm(x, (5,), w, b), rtol=2e-2, atol=2e-2)
    assert ln.dtype == torch.bfloat16
    torch.testing.assert_close(ln_all, F.layer_norm(x.float(), (3, 5)))
    torch.testing.assert_close(inorm, F.instance_norm(x.float(), weight=w[:3].float(),
                                                      bias=b[:3].float()))
