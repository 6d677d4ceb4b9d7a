"""Taylor decomposition: exact terms on polynomials, per-order IG split, convergence, errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taylor_kernels as tk
from tests.models import mlp


class ProductPolynomial(torch.nn.Module):
    """``f(x) = sum_m c_m prod_{j in kappa_m} x_j`` (kappa_m: feature indices with repeats)."""

    def __init__(self, terms):
        super().__init__()
        self.terms = terms

    def forward(self, x):
        out = torch.zeros(x.shape[0], dtype=x.dtype)
        for c, kappa in self.terms:
            t = torch.full((x.shape[0],), c, dtype=x.dtype)
            for j in kappa:
                t = t * x[:, j]
            out = out + t
        return out


def poly_terms(D):
    term = st.tuples(st.floats(-2, 2), st.lists(st.integers(0, D - 1), min_size=1, max_size=3))
    return st.lists(term, min_size=1, max_size=5)


def draw(seed, *shapes):
    """Independent standard normal float64 tensors of the given shapes, seeded."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in shapes]


def line_coefficients(f, x0, v, degree=3):
    """Coefficients of the cubic t -> f(x0 + t v) from 4 samples (Vandermonde solve)."""
    t = torch.tensor([-1.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    vals = f(x0 + t[:, None] * v)
    V = torch.stack([t ** k for k in range(degree + 1)], dim=1)
    return torch.linalg.solve(V, vals)


@settings(max_examples=12, deadline=None)
@given(terms=poly_terms(3), seed=st.integers(0, 1000))
def test_polynomial_terms_exact(terms, seed):
    f = ProductPolynomial(terms)
    x, b = draw(seed, (2, 3), (2, 3))
    r = tk.taylor_decomposition(f, x, b, order=3)
    scale = 1 + (r.fx - r.fb).abs() + r.order_totals.abs().sum(0)
    assert (r.residual.abs() <= 1e-12 * scale).all()
    for n in range(2):
        delta = x[n] - b[n]
        for i in range(3):
            c = line_coefficients(f, b[n], delta * torch.eye(3, dtype=torch.float64)[i])
            assert torch.allclose(r.first_order[n, i], c[1], atol=1e-10)
            assert torch.allclose(r.independent[:, n, i], c[2:], atol=1e-10)
    # order 2: independent + pairs = c_2(Delta); pairs are symmetric with zero diagonal
    assert torch.allclose(r.pairwise.sum((1, 2)) / 2, r.interactions[0], atol=1e-10)
    assert torch.equal(r.pairwise, r.pairwise.transpose(1, 2))
    assert (torch.diagonal(r.pairwise, dim1=1, dim2=2) == 0).all()


@settings(max_examples=10, deadline=None)
@given(terms=poly_terms(4), seed=st.integers(0, 1000))
def test_ig_split_sums_to_ig(terms, seed):
    f = ProductPolynomial(terms)
    x, b = draw(seed, (2, 4), (4,))
    r = tk.taylor_decomposition(f, x, b, order=3)
    ig = tk.integrated_gradients(f, x, b, steps=8).attributions
    assert torch.allclose(r.ig_by_order.sum(0), ig, atol=1e-10)
    # Euler: each order's shares add up to that order's terms
    assert torch.allclose(r.ig_by_order.sum(2), r.order_totals, atol=1e-10)


def test_ig_split_of_a_monomial_is_kappa_over_order():
    f = ProductPolynomial([(1.5, [0, 0, 2])])          # 1.5 x0^2 x2: order 3, kappa = (2, 0, 1)
    x = torch.tensor([[0.7, -1.2, 1.3]], dtype=torch.float64)
    r = tk.taylor_decomposition(f, x, None, order=3)
    term = 1.5 * 0.7 ** 2 * 1.3
    expect = torch.tensor([[2 / 3 * term, 0.0, 1 / 3 * term]], dtype=torch.float64)
    assert torch.allclose(r.ig_by_order[2], expect, atol=1e-12)
    assert r.ig_by_order[:2].abs().max() < 1e-12
    assert torch.allclose(r.interactions[1], torch.tensor([term], dtype=torch.float64))


def test_residual_shrinks_with_order_on_mlp():
    model = mlp(d_in=6, d_out=3).eval()
    b = torch.randn(2, 6, dtype=torch.float64)
    x = b + 0.05 * torch.randn(2, 6, dtype=torch.float64)
    res = [tk.taylor_decomposition(model, x, b, target=1, order=j).residual.abs()
           for j in (1, 2, 3)]
    assert (res[1] < res[0]).all() and (res[2] < res[1]).all()
    r = tk.taylor_decomposition(model, x, b, target=torch.tensor([0, 2]), order=2)
    text = r.summary()
    assert "residual" in text and "input 1" in text
    first = tk.taylor_decomposition(model, x, b, target=1, order=1).summary()  # (crashed:
    assert "order 1" in first and "order 2" not in first  # no independent terms to sum)


def test_pairs_match_the_hessian_on_mlp():
    model = mlp(d_in=5, d_out=3).eval()
    x, b = draw(7, (2, 5), (2, 5))
    r = tk.taylor_decomposition(model, x, b, target=2, order=2)
    H = tk.hessian(lambda z: model(z)[:, 2], b)                           # [B, D, D]
    delta = x - b
    expect = H * delta[:, :, None] * delta[:, None, :]
    expect = expect - torch.diag_embed(torch.diagonal(expect, dim1=1, dim2=2))
    assert torch.allclose(r.pairwise, expect, atol=1e-12)
    assert torch.allclose(r.independent[0], 0.5 * torch.diagonal(H, dim1=1, dim2=2) * delta ** 2,
                          atol=1e-12)


def test_image_input_shapes():
    from tests.models import cnn
    model = cnn(size=4).eval()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    r = tk.taylor_decomposition(model, x, None, target=2, order=2)
    assert r.first_order.shape == (1, 2, 4, 4)
    assert r.independent.shape == (1, 1, 2, 4, 4)
    assert r.pairwise.shape == (1, 32, 32)
    assert r.ig_by_order.shape == (2, 1, 2, 4, 4)


def test_errors():
    model = mlp(d_in=3, d_out=1)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="order"):
        tk.taylor_decomposition(model, x, order=0)
    with pytest.raises(TypeError, match="one input tensor"):
        tk.taylor_decomposition(model, (x,), order=2)
    with pytest.raises(ValueError, match="one baseline per input"):
        tk.taylor_decomposition(model, x, torch.zeros(2, 4, 3, dtype=torch.float64), order=2)


def test_bf16_model_terms_summed_in_float32():
    """A bf16 model's coefficients come in bf16; every field is float32 and the residual is
    taken in float32 (it was bf16, adding its rounding to the bookkeeping), within bf16's
    precision of the float32 model's terms."""
    torch.manual_seed(0)
    model32 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1),
                                  torch.nn.Flatten(0))
    x, b = torch.randn(2, 4), torch.randn(2, 4)
    want = tk.taylor_decomposition(model32, x, b, order=3)
    model16 = torch.nn.Sequential(*[m for m in model32]).to(torch.bfloat16)
    got = tk.taylor_decomposition(model16, x.bfloat16(), b.bfloat16(), order=3)
    fields = ("first_order", "independent", "pairwise", "interactions", "order_totals",
              "residual", "fx", "fb", "ig_by_order")
    assert all(getattr(got, n).dtype == torch.float32 for n in fields)
    torch.testing.assert_close(got.residual, got.fx - got.fb - got.order_totals.sum(0),
                               rtol=0, atol=0)
    for n in ("fx", "order_totals", "first_order"):
        torch.testing.assert_close(getattr(got, n), getattr(want, n), rtol=3e-2, atol=3e-2)
