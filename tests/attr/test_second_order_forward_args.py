"""``additional_forward_args`` on the second- and higher-order APIs: every row's arguments go
with it through chunks, probes and jets, so a batch call equals one call per row with that row's
arguments closed over (float64); shared, ``[1, ...]`` and non-tensor arguments; the trace takes
argument tensors as inputs (a later call with other values is not served stale values); check
R pairs rows that differ only in their arguments; a padded transformer batch with its mask."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import taylor_kernels as tk

B, D = 4, 5


class Gated(nn.Module):
    """``tanh((x * m) W1 + c) W2 * s``: rows gated by a per-row mask ``m [B, D]``, a shared
    offset ``c [1, H]`` and a number ``s`` (not separable: every pair of features interacts)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W1 = nn.Parameter(torch.randn(D, 6, generator=g, dtype=torch.float64))
        self.W2 = nn.Parameter(torch.randn(6, 3, generator=g, dtype=torch.float64))

    def forward(self, x, m, c, s=1.0):
        return torch.tanh((x * m) @ self.W1 + c) @ self.W2 * s


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    m = torch.rand(B, D, generator=g, dtype=torch.float64) + 0.5
    c = torch.randn(1, 6, generator=g, dtype=torch.float64)
    return Gated(), x, m, c


def _scalar(model, target=0):
    return lambda z, m, c, s=1.0: model(z, m, c, s)[:, target]


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_hvp_hessian_diagonal_and_third_order_follow_the_rows(case, chunk_size):
    model, x, m, c = case
    f = _scalar(model)
    args = (m, c, 2.0)
    v = torch.randn(B, 2, D, dtype=torch.float64)
    H = tk.hessian(f, x, additional_forward_args=args, chunk_size=chunk_size)
    ref = torch.stack([torch.autograd.functional.hessian(
        lambda z, b=b: f(z[None], m[b:b + 1], c, 2.0).sum(), x[b]) for b in range(B)])
    torch.testing.assert_close(H, ref, atol=1e-12, rtol=0)
    hv = tk.hvp(f, x, v, additional_forward_args=args, chunk_size=chunk_size)
    torch.testing.assert_close(hv, torch.einsum("bij,bmj->bmi", ref, v), atol=1e-12, rtol=0)
    blk = tk.hessian_block(f, x, v, additional_forward_args=args, chunk_size=chunk_size)
    torch.testing.assert_close(blk, torch.einsum("bni,bij,bmj->bmn", v, ref, v), atol=1e-12,
                               rtol=0)
    diag = tk.hessian_diagonal(f, x, additional_forward_args=args, chunk_size=chunk_size)
    torch.testing.assert_close(diag, torch.diagonal(ref, dim1=1, dim2=2), atol=1e-12, rtol=0)
    hutch = tk.hessian_diagonal(f, x, "hutchinson", samples=8, seed=3,
                                additional_forward_args=args, chunk_size=chunk_size)
    alone = torch.cat([tk.hessian_diagonal(lambda z, b=b: f(z, m[b:b + 1], c, 2.0), x,
                                           "hutchinson", samples=8, seed=3)[b:b + 1]
                       for b in range(B)])  # (the same vectors: they depend on the row index)
    torch.testing.assert_close(hutch, alone, atol=1e-12, rtol=0)
    u, w = v[:, 0], v[:, 1]
    third = tk.third_order(f, x, u, w, additional_forward_args=args)
    for b in range(B):
        def vhu(z, b=b):
            hu = torch.autograd.functional.hvp(lambda y: f(y[None], m[b:b + 1], c, 2.0).sum(),
                                               z, u[b], create_graph=True)[1]
            return hu @ w[b]
        ref3 = torch.autograd.functional.jacobian(vhu, x[b])
        torch.testing.assert_close(third[b], ref3, atol=1e-10, rtol=0)


def test_jet_and_mixed_partials_trace_the_arguments_as_inputs(case):
    model, x, m, c = case
    v = torch.randn(B, 3, D, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # traced: no nested-jvp fallback
        coeffs = tk.jet(model, x, v, 4, target=target, additional_forward_args=(m, c, 2.0))
        m2 = m.flip(0)  # the same shapes, other values: the cached trace must not keep m
        again = tk.jet(model, x, v, 4, target=target, additional_forward_args=(m2, c, 2.0))
    for k_m, out in ((m, coeffs), (m2, again)):
        for b in range(B):
            ref = tk.jet(lambda z, b=b: model(z, k_m[b:b + 1], c, 2.0), x[b:b + 1], v[b:b + 1],
                         4, target=int(target[b]), fallback=True)
            torch.testing.assert_close(out[:, b:b + 1], ref, atol=1e-11, rtol=0)
    sets = [(0, 1), (2, 2, 3), (0, 1, 3, 4)]
    mp = tk.mixed_partials(model, x, sets, target=target, additional_forward_args=(m, c, 2.0))
    for b in range(B):
        ref = tk.mixed_partials(lambda z, b=b: model(z, m[b:b + 1], c, 2.0), x[b:b + 1], sets,
                                target=int(target[b]), cache=False)
        torch.testing.assert_close(mp[b:b + 1], ref, atol=1e-10, rtol=0)


def test_interactions_and_their_searches_follow_the_rows(case):
    model, x, m, c = case
    target = torch.tensor([0, 2, 1, 0])
    args = (m, c, 2.0)

    def alone(b, **kw):
        return tk.interactions(lambda z: model(z, m[b:b + 1], c, 2.0), x[b:b + 1],
                               int(target[b]), **kw).derivatives

    for kw in ({}, {"order": 3, "sets": [(0, 1, 2), (1, 1, 3)]},
               {"feature_mask": torch.tensor([0, 0, 1, 2, 2])}):
        got = tk.interactions(model, x, target, additional_forward_args=args, **kw).derivatives
        ref = torch.cat([alone(b, **kw) for b in range(B)])
        torch.testing.assert_close(got, ref, atol=1e-11, rtol=0)
    pairs = torch.cat([alone(b) for b in range(B)]).abs()
    glob = tk.global_interactions(model, x, target, additional_forward_args=args, batch_size=3)
    torch.testing.assert_close(glob.strengths, pairs.mean(0), atol=1e-11, rtol=0)
    greedy = tk.greedy_interaction_sets(model, x, target, max_order=3, beam=2,
                                        additional_forward_args=args)
    best_pair = max(((i, j) for i in range(D) for j in range(i + 1, D)),
                    key=lambda p: float(pairs.mean(0)[p]))
    assert greedy[2][0][0] == best_pair


def test_taylor_decomposition_and_taylor_cam_follow_the_rows(case):
    model, x, m, c = case
    target = torch.tensor([0, 2, 1, 0])
    bl = torch.randn(B, D, dtype=torch.float64) * 0.1
    td = tk.taylor_decomposition(model, x, bl, target, order=3,
                                 additional_forward_args=(m, c, 2.0))
    for b in range(B):
        one = tk.taylor_decomposition(lambda z, b=b: model(z, m[b:b + 1], c, 2.0), x[b:b + 1],
                                      bl[b:b + 1], int(target[b]), order=3)
        for name in ("first_order", "independent", "pairwise", "residual", "fx", "fb"):
            got, ref = getattr(td, name), getattr(one, name)
            got = got[:, b:b + 1] if name == "independent" else got[b:b + 1]
            torch.testing.assert_close(got, ref, atol=1e-11, rtol=0, msg=name)
        torch.testing.assert_close(td.ig_by_order[:, b:b + 1], one.ig_by_order, atol=1e-11,
                                   rtol=0)
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    head = nn.Linear(3 * 16, 2).double()
    cnn = lambda img, gain: head(torch.tanh(conv(img) * gain).flatten(1))  # noqa: E731
    img = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    gain = torch.rand(2, 3, 1, 1, dtype=torch.float64) + 0.5
    cam = tk.taylor_cam(cnn, conv, img, 1, additional_forward_args=gain)
    for b in range(2):
        one = tk.taylor_cam(lambda z, b=b: cnn(z, gain[b:b + 1]), conv, img[b:b + 1], 1)
        torch.testing.assert_close(cam.cross[b:b + 1], one.cross, atol=1e-11, rtol=0)


class Inspects(Gated):
    """:class:`Gated` that reads its mask's rank and dtype (a tracer proxy has neither)."""

    def forward(self, x, m, c, s=1.0):
        if m.dim() == 2 and m.dtype == torch.float64:
            x = x * m
        return torch.tanh(x @ self.W1 + c) @ self.W2 * s


def test_jet_of_a_model_that_inspects_its_arguments_is_traced(case):
    """The tensors cannot be the trace's inputs (``m.dim()`` of a proxy): the model is traced
    with each call's tensors as constants, not run by nested forward AD, and a later call with
    other values gets its own."""
    _, x, m, c = case
    model = Inspects()
    v = torch.randn(B, 2, D, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # traced: no nested-jvp fallback
        outs = [tk.jet(model, x, v, 3, target=1, additional_forward_args=(k_m, c))
                for k_m in (m, m.flip(0), m.flip(0))]
    for k_m, out in zip((m, m.flip(0), m.flip(0)), outs):
        ref = tk.jet(model, x, v, 3, target=1, additional_forward_args=(k_m, c), fallback=True)
        torch.testing.assert_close(out, ref, atol=1e-11, rtol=0)


def test_a_bad_x_is_named_before_the_arguments(case):
    """``x`` is checked before the forward args are matched to its rows."""
    model, x, m, c = case
    for bad in (x[0], torch.zeros(0, D, dtype=torch.float64)):
        with pytest.raises(ValueError, match="x must be a tensor"):
            tk.hessian(_scalar(model), bad, additional_forward_args=(m, c))


def test_check_r_pairs_rows_that_differ_only_in_their_arguments():
    """Identical inputs, masks that differ: a model mixing the rows' masks is refused (the
    partner row for the check is one with another mask, with that mask)."""
    x = torch.randn(1, D, dtype=torch.float64).expand(B, D).clone()
    m = torch.rand(B, D, dtype=torch.float64)

    def mixes(z, mask):  # zero for a row alone or beside its own mask, not beside another
        return (torch.tanh(z) * (mask - mask.mean(0))).sum(1)

    with pytest.raises(ValueError, match="mix|couple|depend"):
        tk.hessian(mixes, x, additional_forward_args=m)
    with pytest.raises(ValueError, match="mix|couple|depend"):
        tk.jet(mixes, x, torch.ones_like(x), 2, additional_forward_args=m)


def test_argument_of_another_batch_size_is_named(case):
    model, x, m, c = case
    with pytest.raises(ValueError, match=r"additional forward arg of shape \(3, 5\)"):
        tk.hvp(_scalar(model), x, torch.ones_like(x), additional_forward_args=(m[:3], c))
    with pytest.raises(ValueError, match=r"additional forward arg of shape \(3, 5\)"):
        tk.interactions(model, x, 0, additional_forward_args=(m[:3], c))


def test_padded_transformer_batch_with_its_mask():
    """A right-padded batch of a tiny GPT-2 with its attention mask: each row's Hessian in its
    input embeddings equals the row's own call with its mask closed over."""
    pytest.importorskip("transformers")
    from taylor_kernels.models import tiny

    model = tiny.gpt2(layers=1, d=8).double()
    emb = model.get_input_embeddings()
    ids = torch.tensor([[3, 5, 7], [4, 6, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    e = emb(ids).detach()

    def f(z, m):
        return model(inputs_embeds=z, attention_mask=m).logits[:, 1, 2]

    got = tk.interactions(f, e, additional_forward_args=mask).derivatives
    for b in range(2):
        one = tk.interactions(lambda z, b=b: f(z, mask[b:b + 1].expand(z.shape[0], -1)),
                              e[b:b + 1]).derivatives  # (its probes run two rows)
        torch.testing.assert_close(got[b:b + 1], one, atol=1e-10, rtol=0)
    assert got[1].abs().sum() > 0


def test_pair_cost_is_measured_per_form_of_the_arguments(monkeypatch):
    """The measured HVP cost is cached per form of the forward args: a cost measured with a
    small argument was reused for a large one (an explicit budget exceeded 3.5x)."""
    from taylor_kernels.engine import derivative

    costs = []
    real = derivative.pair_cost
    monkeypatch.setattr(derivative, "pair_cost",
                        lambda *a, **k: costs.append(real(*a, **k)) or costs[-1])

    def f(z, e):  # saves tensors the size of e per row
        return torch.tanh(z.sum(1, keepdim=True) * e).sum(1) + (z ** 3).sum(1)

    x = torch.randn(B, D, dtype=torch.float64)
    for width in (1, 20000, 1):
        e = torch.rand(B, width, dtype=torch.float64)
        tk.hessian(f, x, additional_forward_args=e, max_memory="64MB")
    small, large, again = (c.per_pair + c.fixed for c in costs)
    assert large > 100 * small and again == small
