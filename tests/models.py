"""Small models shared by the tests (float64 unless stated)."""
from __future__ import annotations

import torch
from torch import nn


def mlp(d_in=10, hidden=16, d_out=3, act=nn.Tanh, dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, hidden), act(),
                         nn.Linear(hidden, d_out)).to(dtype)


class SmallCNN(nn.Module):
    """conv(3x3) -> tanh -> avgpool -> conv -> gelu -> linear; input [B, C, H, W]."""

    def __init__(self, channels=2, classes=4, size=8):
        super().__init__()
        self.c1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * (size // 2) ** 2, classes)

    def forward(self, x):
        h = nn.functional.avg_pool2d(torch.tanh(self.c1(x)), 2)
        return self.fc(nn.functional.gelu(self.c2(h)).flatten(1))


def cnn(dtype=torch.float64, seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(**kw).to(dtype)


class TwoInputModel(nn.Module):
    """f(a, b, scale, flag) with a [B, 5], b [B, 2, 3], per-row scale [B, 1], a python flag."""

    def __init__(self):
        super().__init__()
        self.la = nn.Linear(5, 4)
        self.lb = nn.Linear(6, 4)

    def forward(self, a, b, scale, flag=True):
        h = torch.tanh(self.la(a) + self.lb(b.flatten(1)) * scale)
        return h * 2 if flag else h


def two_input_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return TwoInputModel().double()


class Polynomial(nn.Module):
    """f(x) = sum_m c_m prod_i x_i^{k_mi}: every Taylor term known exactly."""

    def __init__(self, coeffs: torch.Tensor, powers: torch.Tensor):
        super().__init__()
        self.register_buffer("coeffs", coeffs)   # [M]
        self.register_buffer("powers", powers)   # [M, D] integer exponents

    def forward(self, x):
        return (self.coeffs * torch.prod(x.unsqueeze(1) ** self.powers, dim=2)).sum(1)


def random_polynomial(D=4, M=6, max_power=3, seed=0, dtype=torch.float64) -> Polynomial:
    g = torch.Generator().manual_seed(seed)
    powers = torch.randint(0, max_power + 1, (M, D), generator=g).to(dtype)
    return Polynomial(torch.randn(M, generator=g, dtype=dtype), powers)
