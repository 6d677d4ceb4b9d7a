"""Check R from the first batch of real points (IG, EG, SIG, GradientShap): the output and the
target are checked before anything is gathered, on every first forward (also the one that
measures an endpoint row under ``max_memory``); a model changing its input in place is named;
a model behind a global keeps its buffers; and a call whose every batch is one row still finds
a random model (a QA pass of the change found each of these broken)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import taylor_kernels as tk
import taylor_kernels.captum as tkc

F64 = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


@pytest.mark.parametrize("budget", [None, "100MB"])
def test_an_out_of_range_target_is_named_before_it_is_gathered(budget):
    model, x = _mlp(), torch.randn(2, 4, dtype=F64)
    with pytest.raises(IndexError, match="out of range"):
        tk.integrated_gradients(model, x, target=5, steps=4, max_memory=budget)
    with pytest.raises(IndexError, match="out of range"):
        tk.expected_gradients(model, x, torch.randn(3, 4, dtype=F64), target=-4, samples=2,
                              max_memory=budget)


NET = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def _behind_a_global(z):
    return NET(z)


@pytest.mark.parametrize("budget", [None, "200MB"])
def test_a_train_mode_model_behind_a_global_is_refused_with_its_buffers_kept(budget):
    NET.train()
    bn = NET[1]
    mean, count = bn.running_mean.clone(), int(bn.num_batches_tracked)
    with pytest.raises(ValueError, match="couple rows or are random"):
        tk.integrated_gradients(_behind_a_global, torch.randn(3, 4, dtype=F64), target=0,
                                steps=4, max_memory=budget)
    assert torch.equal(bn.running_mean, mean) and int(bn.num_batches_tracked) == count


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3).double()

    def forward(self, z):
        return F.dropout(self.l(z), 0.5, training=True)


@pytest.mark.parametrize("call", ["gradient_shap_one_sample", "ig_chunk_of_one"])
def test_a_random_model_is_refused_when_every_batch_is_one_row(call):
    model, x = FunctionalDropout(), torch.randn(1, 4, dtype=F64)
    with pytest.raises(ValueError, match="different outputs for the same input"):
        if call == "gradient_shap_one_sample":
            tkc.GradientShap(model).attribute(x, torch.zeros(2, 4, dtype=F64), target=0,
                                              n_samples=1)
        else:
            tk.integrated_gradients(model, x, target=0, steps=4, chunk_size=1)


class ReluInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3).double()

    def forward(self, z):
        z.relu_()
        return self.l(z)


@pytest.mark.parametrize("call", ["ig", "gradient_shap"])
def test_a_model_changing_its_input_in_place_is_named(call):
    model, x = ReluInPlace(), torch.randn(2, 4, dtype=F64)
    keep = x.clone()
    with pytest.raises(ValueError, match="changes its input in place"):
        if call == "ig":
            tk.integrated_gradients(model, x, target=0, steps=4)
        else:
            tkc.GradientShap(model).attribute(x, torch.zeros(2, 4, dtype=F64), target=0)
    assert torch.equal(x, keep)


class MixesRows(nn.Module):
    """Adds half the batch mean: rows couple without batch norm."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3).double()

    def forward(self, z):
        h = self.l(z)
        return torch.tanh(h - 0.5 * h.mean(0, keepdim=True))


def test_one_row_path_batches_leave_the_mixing_check_to_the_delta_batch():
    """GradientShap's path in one-row chunks checks only randomness; its delta's endpoint
    batch (inputs and baselines together) still finds a model that mixes rows."""
    with pytest.raises(ValueError, match="mixes rows"):
        tkc.GradientShap(MixesRows()).attribute(
            torch.randn(1, 4, dtype=F64), torch.zeros(2, 4, dtype=F64), target=0, n_samples=3,
            internal_batch_size=1, return_convergence_delta=True)


def test_adaptive_rule_warns_when_its_levels_still_disagree():
    """Errors that cancel in the sum at every level (the gap is 0 throughout): after 63 nodes
    the rule says so rather than return them silently."""
    f = lambda z: torch.tanh(400 * (z[:, 0] - 0.5)) - torch.tanh(400 * (z[:, 1] - 0.5))  # noqa
    with pytest.warns(RuntimeWarning, match="still change"):
        tk.integrated_gradients(f, torch.ones(1, 2, dtype=F64), rule="adaptive")


def test_a_transformer_encoders_fast_path_is_not_taken_for_randomness():
    """One-row path chunks run with grad (the encoder's slow path); the kept row is computed
    again in the same mode (without grad the fast path returns other values at the padded
    positions)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).double().eval()
    pad = torch.tensor([[False, False, True]])

    def f(z):
        return enc(z, src_key_padding_mask=pad.expand(z.shape[0], -1))[:, 0].sum(-1)

    x = torch.randn(1, 3, 8, dtype=F64)
    res = tk.integrated_gradients(f, x, steps=4, chunk_size=1)
    assert torch.isfinite(res.attributions).all()


def test_a_mixing_model_is_refused_when_every_batch_held_one_row():
    """Without a delta the IG front runs no batch of inputs and baselines; with
    internal_batch_size=1 no batch holds two rows: the mixing check still runs at the end."""
    with pytest.raises(ValueError, match="mixes rows"):
        tkc.IntegratedGradients(MixesRows()).attribute(torch.randn(2, 4, dtype=F64), target=0,
                                                       n_steps=4, internal_batch_size=1)
