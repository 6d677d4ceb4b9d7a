"""Casts to integer or bool dtypes inside a model: piecewise constant, so no derivative passes
them. The jet took ``.to(int)``/``.type_as(int tensor)`` as linear per coefficient (found by a
differential fuzz: order-1..3 coefficients wrong, silently); the exact rule took them as the
identity. Float64 against nested reverse mode; the exact rule falls back naming the cast."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import taylor_kernels as tk

DT = torch.float64
CASTS = {
    "to_int64": lambda z: z.to(torch.int64),
    "to_bool": lambda z: z.to(torch.bool),
    "to_dtype_kw": lambda z: z.to(dtype=torch.int32),
    "type_as_long": lambda z: z.type_as(torch.zeros(1, dtype=torch.long)),
    "long": lambda z: z.long(),
    "to_float32": lambda z: z.to(torch.float32),  # (a floating cast stays linear)
}


class Bucketed(nn.Module):
    def __init__(self, cast):
        super().__init__()
        self.lin, self.cast = nn.Linear(4, 4).to(DT), cast

    def forward(self, h):
        h = self.lin(h)
        q = self.cast(torch.tanh(h) * 5)
        return (q.to(h.dtype) * h).sum(-1)


def taylor_reference(f, x, v, order):
    """``[order+1]`` coefficients of ``t -> f(x + t v)`` by nested reverse mode."""
    t = torch.zeros((), dtype=DT, requires_grad=True)
    y, out = f(x + t * v), []
    out.append(y.detach())
    for k in range(1, order + 1):
        (y,) = torch.autograd.grad(y, t, create_graph=True, allow_unused=True,
                                   materialize_grads=True)
        out.append(y.detach() / math.factorial(k))
    return torch.stack(out)


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_jet_through_a_cast(cast):
    torch.manual_seed(0)
    model = Bucketed(CASTS[cast]).eval()
    x, v = torch.randn(2, 4, dtype=DT), torch.randn(2, 1, 4, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (a rule, no nested-jvp fallback)
        got = tk.jet(model, x, v, order=3, cache=False)[:, :, 0]
    for r in range(2):
        want = taylor_reference(lambda z: model(z[None])[0], x[r], v[r, 0], 3)
        torch.testing.assert_close(got[:, r], want, rtol=1e-6 if cast == "to_float32"
                                   else 1e-12, atol=1e-6 if cast == "to_float32" else 1e-12)


def test_exact_rule_falls_back_at_an_integer_cast():
    torch.manual_seed(0)

    class Stepped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6).to(DT), nn.Linear(6, 1).to(DT)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h)[:, 0] + (h * 3).to(torch.int64).to(h.dtype).sum(-1)

    model, x = Stepped(), torch.randn(2, 4, dtype=DT)
    with pytest.warns(RuntimeWarning, match="cast to torch.int64"), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", "2 input.s. miss the completeness")  # (steps)
        res = tk.integrated_gradients(model, x, rule="exact")
    assert (res.regions == -1).all()
