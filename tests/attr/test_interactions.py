"""Cross-derivative interactions: mixed partials against torch.func, symmetry, separability,
group masks, greedy search, global aggregation, errors."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.func import hessian as func_hessian
from torch.func import jacfwd, jacrev

import taylor_kernels as tk
from taylor_kernels.attr.interactions import (global_interactions, greedy_interaction_sets,
                                              representative_rows)
from tests.models import mlp

TOL = 1e-10


def _row_fn(model, target):
    return lambda z: model(z.unsqueeze(0))[0, target]


def _derivative_tensor(model, x, target, order):
    """Full ``order``-th derivative tensor of one row by nested jacfwd over jacrev."""
    g = jacrev(_row_fn(model, target))
    for _ in range(order - 1):
        g = jacfwd(g)
    return g(x)


def test_pairs_match_func_hessian_with_per_row_targets():
    model = mlp(d_in=6, hidden=9, d_out=3)
    x = torch.randn(5, 6, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 2, 0])
    res = tk.interactions(model, x, target)
    assert res.derivatives.shape == (5, 6, 6) and res.sets is None
    for b in range(5):
        ref = func_hessian(_row_fn(model, int(target[b])))(x[b])
        torch.testing.assert_close(res.derivatives[b], ref, atol=TOL, rtol=0)
    torch.testing.assert_close(res.derivatives, res.derivatives.transpose(1, 2), atol=TOL, rtol=0)
    assert torch.equal(res.strengths, res.derivatives.abs())


@pytest.mark.parametrize("order", [2, 3, 4])
def test_k_way_sets_match_nested_jacfwd(order):
    model = mlp(d_in=5, hidden=7, d_out=2, seed=order)
    x = torch.randn(3, 5, dtype=torch.float64)
    sets = [(0, 1, 2, 3)[:order], (4, 2, 0, 1)[:order], (1,) * (order - 1) + (3,),
            (2, 4, 4, 0)[:order]]
    res = tk.interactions(model, x, target=1, order=order, sets=sets)
    assert res.derivatives.shape == (3, len(sets)) and res.sets == sets
    for b in range(3):
        full = _derivative_tensor(model, x[b], 1, order)
        ref = torch.stack([full[s] for s in sets])
        torch.testing.assert_close(res.derivatives[b], ref, atol=TOL, rtol=0)


def test_mixed_partials_are_symmetric_in_the_set_order():
    model = mlp(d_in=5, hidden=8, d_out=1)
    x = torch.randn(4, 5, dtype=torch.float64)
    perms = list(itertools.permutations((0, 2, 3)))
    res = tk.interactions(model, x, order=3, sets=perms)
    torch.testing.assert_close(res.derivatives, res.derivatives[:, :1].expand(-1, len(perms)),
                               atol=TOL, rtol=0)


def test_all_subsets_when_sets_is_none():
    model = mlp(d_in=5, hidden=6, d_out=1)
    x = torch.randn(2, 5, dtype=torch.float64)
    res = tk.interactions(model, x, order=3)
    assert res.sets == list(itertools.combinations(range(5), 3))
    full = _derivative_tensor(model, x[1], 0, 3)
    torch.testing.assert_close(res.derivatives[1], torch.stack([full[s] for s in res.sets]),
                               atol=TOL, rtol=0)


def test_additively_separable_function_has_no_interactions():
    w = torch.randn(6, dtype=torch.float64)

    def separable(x):  # sum_i g_i(x_i)
        return (torch.tanh(w * x) + x.pow(3) * w + torch.sin(3 * x)).sum(dim=1)

    x = torch.randn(4, 6, dtype=torch.float64)
    H = tk.interactions(separable, x).derivatives
    off = H - torch.diag_embed(torch.diagonal(H, dim1=1, dim2=2))
    assert off.abs().max() < 1e-12
    assert torch.diagonal(H, dim1=1, dim2=2).abs().min() > 0  # the diagonal is not zero
    for k in (3, 4):
        assert tk.interactions(separable, x, order=k).strengths.max() < 1e-12


def test_group_mask_reduces_blocks_of_mixed_partials():
    model = mlp(d_in=7, hidden=8, d_out=2)
    x = torch.randn(3, 7, dtype=torch.float64)
    mask = torch.tensor([2, 0, 0, 1, 2, 1, 0])
    U = torch.nn.functional.one_hot(mask, 3).double()  # [D, m]
    G = tk.interactions(model, x, target=0, feature_mask=mask).derivatives
    H = tk.interactions(model, x, target=0).derivatives
    torch.testing.assert_close(G, U.T @ H @ U, atol=TOL, rtol=0)
    sets = [(0, 1, 2), (1, 1, 2)]
    res = tk.interactions(model, x, target=0, order=3, sets=sets, feature_mask=mask)
    for b in range(3):
        T = _derivative_tensor(model, x[b], 0, 3)
        block = torch.einsum("ijk,ia,jb,kc->abc", T, U, U, U)
        torch.testing.assert_close(res.derivatives[b], torch.stack([block[s] for s in sets]),
                                   atol=TOL, rtol=0)


def test_per_row_mask_and_tuple_inputs():
    lin = torch.nn.Linear(5, 1).double()

    def model(a, b):
        return torch.tanh(lin(torch.cat([a, b.flatten(1)], dim=1))) ** 2

    a, b = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 1, 2, dtype=torch.float64)
    H = tk.interactions(model, (a, b)).derivatives
    assert H.shape == (2, 5, 5)
    masks = (torch.tensor([[0, 1, 1], [1, 0, 0]]), torch.tensor([[[1, 0]], [[0, 0]]]))
    G = tk.interactions(model, (a, b), feature_mask=masks).derivatives
    for r in range(2):
        U = torch.nn.functional.one_hot(torch.cat([masks[0][r], masks[1][r].flatten()]),
                                        2).double()
        torch.testing.assert_close(G[r], U.T @ H[r] @ U, atol=TOL, rtol=0)


def test_small_memory_budget_gives_same_numbers():
    model = mlp(d_in=6, hidden=8, d_out=1)
    x = torch.randn(3, 6, dtype=torch.float64)
    big = tk.interactions(model, x, order=3)
    small = tk.interactions(model, x, order=3, max_memory=200_000)  # a few sets per chunk
    torch.testing.assert_close(small.derivatives, big.derivatives, atol=1e-13, rtol=0)


def test_a_budget_below_one_set_of_nested_forwards_raises(monkeypatch):
    """Nested forward mode holds about NESTED_FORWARD_FACTOR times the saved-activation
    estimate per set (a CNN's order-3 sets ran at 4x of every budget): a budget below one set
    raises before any set runs, and chunks shrink with the factor."""
    from taylor_kernels.attr import interactions as inter
    model = mlp(d_in=6, hidden=8, d_out=1)
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(MemoryError, match="too small for one set of order 3"):
        tk.interactions(model, x, order=3, sets=[(0, 1, 2)], max_memory=2_000)
    sizes = []
    real = inter._mixed_partials
    monkeypatch.setattr(inter, "_mixed_partials",
                        lambda f, x, d, s, chunk, bar: sizes.append(chunk)
                        or real(f, x, d, s, chunk, bar))
    tk.interactions(model, x, order=3, max_memory=200_000)
    monkeypatch.setattr(inter, "NESTED_FORWARD_FACTOR", 1.0)
    tk.interactions(model, x, order=3, max_memory=200_000)
    assert sizes[0] < sizes[1]


def _planted(x):
    """A 3-way interaction of features (1, 3, 4) beside strong pairwise and main effects."""
    return (3 * x[:, 1] * x[:, 3] * x[:, 4] + x[:, 0] * x[:, 2] + 2 * x[:, 5] * x[:, 0]
            + torch.sin(x[:, 2]) + x[:, 6] ** 3)


def test_greedy_search_recovers_planted_three_way_interaction():
    x = torch.rand(16, 7, dtype=torch.float64) * 2 - 1
    found = greedy_interaction_sets(_planted, x, max_order=4, beam=3)
    assert set(found) == {2, 3, 4}
    assert found[3][0][0] == (1, 3, 4)
    assert found[3][0][1] == pytest.approx(3.0, abs=1e-10)
    assert all(v < 1e-10 for _, v in found[3][1:])
    assert all(v < 1e-10 for _, v in found[4])  # no 4-way term planted
    assert len(found[2]) == 21 and found[2][0][0] == (0, 5)


def test_global_interactions_aggregates_and_ranks():
    model = mlp(d_in=4, hidden=6, d_out=2)
    data = torch.randn(11, 4, dtype=torch.float64)
    H = tk.interactions(model, data, target=1).strengths
    for how, ref in (("mean", H.mean(0)), ("median", H.median(0).values), ("max", H.amax(0))):
        g = global_interactions(model, data, 1, aggregate=how, batch_size=4)
        torch.testing.assert_close(g.strengths, ref, atol=TOL, rtol=0)
    vals = [v for _, v in g.ranking]
    assert len(g.ranking) == 6 and vals == sorted(vals, reverse=True)
    i, j = g.ranking[0][0]
    assert g.strengths[i, j] == pytest.approx(vals[0])
    g3 = global_interactions(model, data, 1, order=3, sets=[(0, 1, 2), (1, 2, 3)])
    assert g3.strengths.shape == (2,) and g3.sets == [(0, 1, 2), (1, 2, 3)]
    mask = torch.tensor([[0, 0, 1, 1]] * 11)  # per row, sliced with the batches
    mask[5:] = torch.tensor([0, 1, 1, 0])
    per_row = global_interactions(model, data, 1, feature_mask=mask, batch_size=4,
                                  aggregate="max")
    whole = global_interactions(model, data, 1, feature_mask=mask, batch_size=11,
                                aggregate="max")
    torch.testing.assert_close(per_row.strengths, whole.strengths)


def test_global_median_of_an_even_count_is_the_mean_of_the_middle_two():
    """torch's median takes the lower middle value: median(2, 4, 6, 8) read 4, not 5."""
    def f(z):
        return z[:, 0] * z[:, 1] * z[:, 0]  # d2f / dx0 dx1 = 2 x0
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    g = global_interactions(f, x, aggregate="median")
    assert g.strengths[0, 1].item() == pytest.approx(5.0, abs=1e-9)
    assert global_interactions(f, x[:3], aggregate="median").strengths[0, 1].item() == \
        pytest.approx(4.0, abs=1e-9)


def test_representative_rows():
    data = torch.tensor([[0.0, 0.0], [10.0, 10.0], [3.0, 3.0], [1.0, 2.0], [-1.0, 0.0],
                         [1.5, 1.0]])
    rows = representative_rows(data)  # mean (2.42, 2.67) -> row 2; median (1, 1) -> row 5
    assert rows.tolist() == [2, 5, 4, 1]  # min (-1, 0) -> row 4; max (10, 10) -> row 1
    assert len(representative_rows(data, n_random=6, seed=1)) == 6
    g = global_interactions(lambda x: (x[:, 0] * x[:, 1]).unsqueeze(1), data,
                            points="representative")
    torch.testing.assert_close(g.strengths, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(order=1), "order must be an integer >= 2"),
    (dict(order=3, sets=[(0, 1)]), "pass order=2"),
    (dict(sets=[(0, 9)]), "outside 0..3"),
    (dict(sets=[]), "sets is empty"),
    (dict(feature_mask=torch.zeros(4)), "integer group ids"),
    (dict(feature_mask=torch.zeros(3, dtype=torch.long)), "must be"),
    (dict(feature_mask=torch.tensor([0, -1, 0, 1])), ">= 0"),
])
def test_errors(kwargs, match):
    model = mlp(d_in=4, hidden=5, d_out=1)
    with pytest.raises(ValueError, match=match):
        tk.interactions(model, torch.randn(2, 4, dtype=torch.float64), **kwargs)


def test_global_and_greedy_errors():
    model = mlp(d_in=4, hidden=5, d_out=1)
    data = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="aggregate"):
        global_interactions(model, data, aggregate="sum")
    with pytest.raises(ValueError, match="points"):
        global_interactions(model, data, points="some")
    with pytest.raises(ValueError, match="max_order"):
        greedy_interaction_sets(model, data, max_order=1)
    with pytest.raises(ValueError, match="beam"):
        greedy_interaction_sets(model, data, beam=0)


@pytest.mark.parametrize("kw", [{}, {"order": 3, "sets": [(0, 1, 2)]}])
def test_global_per_row_masks_do_not_depend_on_the_batch_size(kw):
    """The group count was taken per batch: a batch without the highest id failed to
    concatenate (pairs) or refused a valid set (order 3)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 2)).double()
    x = torch.randn(4, 4, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 2, 2], [0, 0, 1, 2], [0, 0, 1, 1], [1, 1, 0, 0]])
    whole = global_interactions(model, x, target=0, feature_mask=mask, batch_size=4, **kw)
    split = global_interactions(model, x, target=0, feature_mask=mask, batch_size=2, **kw)
    torch.testing.assert_close(split.strengths, whole.strengths)


@pytest.mark.parametrize("order, mask", [(5, None), (3, torch.tensor([0, 0, 1, 1]))])
def test_an_order_above_the_feature_count_is_named(order, mask):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match=f"order {order} over"):
        tk.interactions(model, torch.randn(2, 4), order=order, feature_mask=mask)


def test_global_interactions_holds_every_rows_strengths_within_the_budget(monkeypatch):
    """Each batch's call got the whole budget while the strengths of the batches before it
    (and their concatenation) were held beside it: 2.0x of 128 MB for 16 rows of D = 1024."""
    from taylor_kernels.attr import interactions as mod
    budgets = []
    real = mod._local
    monkeypatch.setattr(mod, "_local", lambda *a: budgets.append(a[1]) or real(*a))
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(6, 16)
    whole = global_interactions(model, x, batch_size=6)
    got = global_interactions(model, x, batch_size=2, max_memory="1MB")
    torch.testing.assert_close(got.strengths, whole.strengths)
    held = 6 * 16 * 16 * 4  # [N, D, D] float32
    assert budgets[1] == "1MB" and budgets[2:] == [2**20 - held] * 2
    with pytest.raises(MemoryError, match="strengths of every row"):
        global_interactions(model, torch.randn(300, 16), batch_size=100, max_memory=300_000)


def test_index_sets_take_numpy_and_tensor_ints_and_refuse_floats():
    """``mixed_partials`` refused numpy / 0-d tensor indices that ``interactions`` took, and
    ``interactions`` read a float index 1.5 as 1."""
    import numpy as np
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 1)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    f = lambda z: net(z)[:, 0]  # noqa: E731
    want = tk.mixed_partials(f, x, [(0, 1, 1)])
    for s in [(np.int64(0), np.int32(1), 1), (torch.tensor(0), torch.tensor(1), 1)]:
        torch.testing.assert_close(tk.mixed_partials(f, x, [s]), want)
        got = tk.interactions(net, x, target=0, order=3, sets=[s]).derivatives
        torch.testing.assert_close(got, want)
    for bad in [(0, 1.5, 1), (0, True, 1), (0, torch.tensor(1.0), 1)]:
        with pytest.raises(TypeError, match="index sets hold ints"):
            tk.mixed_partials(f, x, [bad])
        with pytest.raises(TypeError, match="index sets hold ints"):
            tk.interactions(net, x, target=0, order=3, sets=[bad])


def test_order_three_budgets_count_the_weight_copies_of_nested_forward_mode():
    """PyTorch's nested forward mode copies each weight matrix 3^k - 2^k times per chunk, some
    of them alive at once (a 1024-wide MLP's order-3 sets ran at 54-60 MB under 4 MB while the
    backward graph kept them; up to 5 copies without it). The budget counts 2^k: a budget
    below them raises, one above gives the same numbers."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Tanh(),
                              torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 2))
    x = torch.randn(3, 16)
    sets = [(0, 1, 2), (3, 4, 5)]
    with pytest.raises(MemoryError, match="8 weight copies"):  # 8 x 0.27 MB of weights
        tk.interactions(net, x, target=1, order=3, sets=sets, max_memory="2MB")
    want = tk.interactions(net, x, target=1, order=3, sets=sets).derivatives
    got = tk.interactions(net, x, target=1, order=3, sets=sets, max_memory="64MB").derivatives
    torch.testing.assert_close(got, want)


_GLOBAL_NET = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Tanh(),
                                  torch.nn.Linear(256, 256), torch.nn.Tanh(),
                                  torch.nn.Linear(256, 2))


def test_weight_copies_are_counted_for_a_model_behind_a_global():
    """A notebook's ``f = lambda z: model(z)[:, 1]`` reaches the model through a global, which
    the walk of f's modules did not see: its copies went uncounted (the 2 MB budget ran). The
    weights are now the matrices the probe forward saved."""
    x = torch.randn(3, 16)
    f = lambda z: _GLOBAL_NET(z)[:, 1]  # noqa: E731
    with pytest.raises(MemoryError, match="beside 22[0-9]{5} bytes of the 8 weight copies"):
        tk.interactions(f, x, order=3, sets=[(0, 1, 2)], max_memory="2MB")


_HELD_W = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def _held_by_no_grad(z):  # a normaliser the author holds constant, as reverse mode does
    h = torch.tanh(z @ _HELD_W)
    with torch.no_grad():
        s = h.pow(2).sum(-1, keepdim=True)
        first = h[:, :1]  # a view: forward AD derived its tangent from h's when read later
    return (h * s).pow(2).sum(-1) + (first * h).sum(-1) + z[:, 0] * z[:, 1] * z[:, 2]


@pytest.mark.parametrize("order", [2, 3])
def test_a_no_grad_block_is_a_constant_in_k_way_sets_as_in_reverse_mode(order):
    """Nested ``torch.func.jvp`` ignores grad mode: tangents flowed through the block
    (another derivative than reverse mode's, silently). Reference: nested jacrev, which
    respects the block, and a call under an outer no_grad gives the same."""
    x = torch.randn(3, 5, dtype=torch.float64)
    sets = [(0, 1, 2, 3)[:order], (4, 4, 1)[:order], (2, 3, 3)[:order]]
    res = tk.interactions(_held_by_no_grad, x, order=order, sets=sets)
    g = lambda y: _held_by_no_grad(y.unsqueeze(0))[0]  # noqa: E731
    for _ in range(order):
        g = jacrev(g)
    for b in range(3):
        full = g(x[b])
        torch.testing.assert_close(res.derivatives[b], torch.stack([full[s] for s in sets]),
                                   atol=TOL, rtol=0)
    with torch.no_grad():
        outer = tk.interactions(_held_by_no_grad, x, order=order, sets=sets)
    torch.testing.assert_close(outer.derivatives, res.derivatives, atol=TOL, rtol=0)


class _CountsSavedTensors(torch.nn.Module):
    """Counts the tensors autograd saves for a backward in its forward-mode calls (those whose
    input is a functorch wrapper)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 5).double()
        self.saved = 0
        self.counting = True

    def _count(self, t):
        self.saved += 1
        return t

    def forward(self, z):
        if not (self.counting and torch._C._functorch.is_functorch_wrapped_tensor(z)):
            return torch.tanh(self.lin(z)).pow(3).sum(-1)
        with torch.autograd.graph.saved_tensors_hooks(self._count, lambda t: t):
            return torch.tanh(self.lin(z)).pow(3).sum(-1)


def test_k_way_sets_record_no_graph_to_the_parameters():
    """The sets' results are detached, but the nested forward recorded a backward graph to
    the weights beside the tangents (87 saved tensors here; a BERT 4x256's order-3 sets held
    817 MB of it, 118 MB without). Same derivatives as reverse mode."""
    net = _CountsSavedTensors()
    x = torch.randn(3, 5, dtype=torch.float64)
    res = tk.interactions(net, x, order=3, sets=[(0, 1, 2), (3, 3, 4)])
    assert net.saved == 0
    assert net.lin.weight.grad is None and net.lin.weight.requires_grad
    net.counting = False  # (jacrev refuses saved-tensor hooks)
    g = lambda y: net(y.unsqueeze(0))[0]  # noqa: E731
    full = jacrev(jacrev(jacrev(g)))(x[1])
    torch.testing.assert_close(res.derivatives[1], torch.stack([full[0, 1, 2], full[3, 3, 4]]),
                               atol=TOL, rtol=0)
