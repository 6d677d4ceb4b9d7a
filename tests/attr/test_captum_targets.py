"""Targets as Captum reads them: negative indices count from the end, floats raise.

Covers ``engine/problem.py`` (every method built on it: IG, the Captum front) and ``tk.jet``,
which validates class targets with the same rule.
"""
from __future__ import annotations

import pytest
import torch
from captum import attr as ca

import taylor_kernels as tk
import taylor_kernels.captum as tc

F64 = torch.float64


def _setup():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 4).double(), torch.randn(2, 3, dtype=F64)


@pytest.mark.parametrize("neg, pos", [(-1, 3), (torch.tensor(-2), 2),
                                      (torch.tensor([-1, -4]), torch.tensor([3, 0])),
                                      ([-3, -1], [1, 3])])
def test_negative_targets_index_from_the_end(neg, pos):
    model, x = _setup()
    ours = tc.IntegratedGradients(model).attribute(x, target=neg, n_steps=4)
    torch.testing.assert_close(ours, tc.IntegratedGradients(model).attribute(x, target=pos,
                                                                            n_steps=4))
    if isinstance(neg, int) or isinstance(neg, torch.Tensor) and neg.numel() == 1:  # as Captum
        torch.testing.assert_close(ours, ca.IntegratedGradients(model).attribute(
            x, target=neg, n_steps=4))


def test_negative_tuple_targets():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 6).double()

    def model(x):
        return lin(x).reshape(-1, 2, 3)

    x = torch.randn(2, 3, dtype=F64)
    ours = tc.IntegratedGradients(model).attribute(x, target=(-1, -2), n_steps=4)
    torch.testing.assert_close(ours, ca.IntegratedGradients(model).attribute(
        x, target=(-1, -2), n_steps=4))


def test_per_row_tuple_targets_pick_each_rows_output():
    """A list of index tuples, one per input, as in Captum: each row's path reads its own
    tuple (reading it by path point instead gave 0.74 off)."""
    torch.manual_seed(0)
    W = torch.randn(6, 4, dtype=F64)

    def model(x):
        return torch.tanh(x @ W.T).reshape(-1, 2, 3)

    x = torch.randn(3, 4, dtype=F64)
    rows = [(0, 1), (1, 2), (1, 0)]
    got = tk.integrated_gradients(model, x, target=rows, steps=20).attributions
    each = torch.cat([tk.integrated_gradients(model, x[i:i + 1], target=rows[i],
                                              steps=20).attributions for i in range(3)])
    torch.testing.assert_close(got, each, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(tc.IntegratedGradients(model).attribute(x, target=rows),
                               ca.IntegratedGradients(model).attribute(x, target=rows))


@pytest.mark.parametrize("target", [1.0, torch.tensor(1.0), torch.tensor([0.0, 1.0]),
                                    [1.0, 2.0], (1.0,), [(0, 1.0), (1, 0)]])
def test_float_targets_raise(target):
    model, x = _setup()
    with pytest.raises(TypeError, match="integer indices"):
        tc.IntegratedGradients(model).attribute(x, target=target, n_steps=4)
    with pytest.raises(TypeError, match="integer indices"):
        tk.integrated_gradients(model, x, target=target, steps=4)


@pytest.mark.parametrize("target", [4, -5, [0, 4]])
def test_out_of_range_targets_raise(target):
    model, x = _setup()
    with pytest.raises(ValueError, match="out of range"):
        tc.IntegratedGradients(model).attribute(x, target=target, n_steps=4)


def test_jet_validates_targets_like_ig():
    model, x = _setup()
    v = torch.randn_like(x)
    torch.testing.assert_close(tk.jet(model, x, v, 2, target=-1),
                               tk.jet(model, x, v, 2, target=3))
    torch.testing.assert_close(tk.jet(model, x, v, 2, target=[-1, -4]),
                               tk.jet(model, x, v, 2, target=torch.tensor([3, 0])))
    with pytest.raises(TypeError, match="integer indices"):
        tk.jet(model, x, v, 2, target=1.0)
    with pytest.raises(ValueError, match="out of range"):
        tk.jet(model, x, v, 2, target=4)


class _NoHostRead(torch.Tensor):
    def tolist(self):
        raise AssertionError("the rows were read on the host")


def test_tuple_targets_are_gathered_without_reading_rows_on_the_host():
    """Each chunk read its rows with ``.tolist()`` (a sync per chunk on CUDA, and no CUDA
    graph for tuple targets): one gather on the device now, negatives from the end."""
    from taylor_kernels.engine.problem import _target_rows, select_target
    out = torch.randn(3, 2, 3)  # the chunk's rows 3, 1, 0 of a batch of 4
    target = _target_rows([(0, 1), (1, -1), (-2, 2), (1, 0)], 4, out.device)  # (as problems)
    rows = torch.tensor([3, 1, 0]).as_subclass(_NoHostRead)
    got = select_target(out, target, rows)
    want = torch.stack([out[0, 1, 0], out[1, 1, 2], out[2, 0, 1]])
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want)
