"""Taylor-CAM: the formula on a conv layer with a quadratic head (known Hessian), regions,
agreement with torch.func on a nonlinear CNN, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian as func_hessian

import taylor_kernels as tk
from tests.models import cnn

TOL = 1e-10


class QuadraticHead(nn.Module):
    """conv -> y = 0.5 a^T Q a + c . a with ``a`` the flattened conv output, so d^2y/da^2 = Q."""

    def __init__(self, C=3, size=(3, 4)):
        super().__init__()
        self.conv = nn.Conv2d(2, C, 3, padding=1)
        D = C * size[0] * size[1]
        Q = torch.randn(D, D)
        self.register_buffer("Q", Q + Q.T)
        self.c = nn.Parameter(torch.randn(D))

    def forward(self, x):
        a = self.conv(x).flatten(1)
        return (0.5 * torch.einsum("bi,ij,bj->b", a, self.Q, a) + a @ self.c).unsqueeze(1)


def _formula(A: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """TaylorCAM_ij by the paper's formula, in loops: A [C, S], Q [(C S), (C S)]."""
    C, S = A.shape
    Hq = Q.reshape(C, S, C, S)  # (l, i, k, j)
    M = torch.zeros(S, S, dtype=A.dtype)
    for i in range(S):
        for j in range(S):
            M[i, j] = sum(A[l, i] * sum(Hq[l, i, k, j] for k in range(C)) for l in range(C))
    return M.pow(2) + M.T.pow(2), M


def test_formula_on_quadratic_head():
    model = QuadraticHead().double()
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    res = tk.taylor_cam(model, model.conv, x)
    A = model.conv(x).detach()
    assert res.scores.shape == (2, 12, 12)
    for b in range(2):
        ref, M = _formula(A[b].reshape(3, 12), model.Q)
        torch.testing.assert_close(res.cross[b], M, atol=TOL, rtol=0)
        torch.testing.assert_close(res.scores[b], ref, atol=TOL, rtol=0)
    assert (res.scores >= 0).all()
    torch.testing.assert_close(res.scores, res.scores.transpose(1, 2))


def test_regions_sum_the_formula_over_their_cells():
    model = QuadraticHead().double()
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    regions = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 1], [2, 2, 2, 1]])
    res = tk.taylor_cam(model, model.conv, x, regions=regions)
    cells = tk.taylor_cam(model, model.conv, x)
    P = torch.nn.functional.one_hot(regions.flatten(), 3).double()  # [S, R]
    M = P.T @ cells.cross @ P  # region cross terms = cell cross terms summed over the blocks
    torch.testing.assert_close(res.cross, M, atol=TOL, rtol=0)
    torch.testing.assert_close(res.scores, M.pow(2) + M.transpose(1, 2).pow(2), atol=TOL, rtol=0)
    m = res.cell_map()
    assert m.shape == (2, 3, 4)
    total = res.scores.sum(2) - torch.diagonal(res.scores, dim1=1, dim2=2)
    torch.testing.assert_close(m[1, 1, 1], total[1, 2])
    torch.testing.assert_close(res.cell_map(1)[0, 0, 0], res.scores[0, 1, 0])


def test_per_input_regions_apply_to_their_own_row():
    """Regions ``[B, H, W]``: row ``b`` is scored over its own regions, as when run alone."""
    model = QuadraticHead().double()
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    regions = torch.stack([torch.arange(12).reshape(3, 4) % 2,
                           torch.arange(12).reshape(3, 4) // 6])
    res = tk.taylor_cam(model, model.conv, x, regions=regions)
    for b in range(2):
        alone = tk.taylor_cam(model, model.conv, x[b:b + 1], regions=regions[b:b + 1])
        torch.testing.assert_close(res.cross[b], alone.cross[0], atol=TOL, rtol=0)
    assert not torch.allclose(res.cross[1], tk.taylor_cam(
        model, model.conv, x[1:], regions=regions[:1]).cross[0])  # the regions matter


def test_matches_func_hessian_on_cnn_with_per_row_targets():
    model = cnn(size=4)  # Taylor-CAM of c1: tanh, pooling, conv, gelu, linear after it
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    target = [1, 3]
    res = tk.taylor_cam(model, model.c1, x, target)
    assert res.scores.shape == (2, 16, 16)
    for b in range(2):
        A = model.c1(x[b:b + 1])[0].detach()

        def head(a, t=target[b]):
            h = nn.functional.avg_pool2d(torch.tanh(a.unsqueeze(0)), 2)
            return model.fc(nn.functional.gelu(model.c2(h)).flatten(1))[0, t]

        H = func_hessian(head)(A).reshape(4, 16, 4, 16)
        M = torch.einsum("li,likj->ij", A.reshape(4, 16), H)
        assert (M - torch.diag(torch.diagonal(M))).abs().max() > 1e-5  # cells interact
        torch.testing.assert_close(res.cross[b], M, atol=TOL, rtol=0)


def test_errors():
    model = QuadraticHead().double()
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="order=2 only"):
        tk.taylor_cam(model, model.conv, x, order=3)
    with pytest.raises(ValueError, match="spatial shape"):
        tk.taylor_cam(model, model.conv, x, regions=torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        tk.taylor_cam(model, model.conv, x, regions=torch.zeros(3, 4))
    flat = nn.Sequential(nn.Flatten(), nn.Linear(24, 1)).double()
    with pytest.raises(ValueError, match="feature map"):
        tk.taylor_cam(flat, flat[1], x)
    by_name = tk.taylor_cam(model, "conv", x)  # (a name: an AttributeError in a hook once)
    torch.testing.assert_close(by_name.scores, tk.taylor_cam(model, model.conv, x).scores)
    with pytest.raises(TypeError, match="got int"):
        tk.taylor_cam(model, 3, x)
    with pytest.raises(ValueError, match=r"input 0 has shape \(0, 2, 3, 4\).*non-empty"):
        tk.taylor_cam(model, model.conv, x[:0])  # (it named the activation's shape)
    res = tk.taylor_cam(model, model.conv, x)
    with pytest.raises(ValueError, match="outside"):
        res.cell_map(12)


def test_a_region_id_far_past_the_cells_is_refused_before_any_allocation():
    """Ids are region numbers (R = max id + 1): one id of 10**6 asked the allocator for a
    [B, R, R] result of 4 TB, and its error came back."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softplus(), nn.Flatten(), nn.Linear(18, 2))
    with pytest.raises(MemoryError, match="number the regions 0..R-1"):
        tk.taylor_cam(net, net[0], torch.randn(1, 1, 5, 5), target=0,
                      regions=torch.full((3, 3), 10**6))
