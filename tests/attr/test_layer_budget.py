"""Layer methods size what their path will hold from one row's capture, before the whole-batch
captures: a budget that cannot hold it raises ``MemoryError`` after a one-row forward (the
captures of every row ran first and reached 3.4-4.5x of an 8 MB budget), and a budget that
can leaves the numbers as they were."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import taylor_kernels as tk
from taylor_kernels.attr import layer_paths


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Tanh(), nn.Flatten(), nn.Linear(8 * 16 * 16, 3)).eval()


CALLS = {
    "layer_integrated_gradients": lambda m, x, **kw: tk.layer_integrated_gradients(
        m, m[2], x, target=1, steps=4, **kw),
    "multi_layer_integrated_gradients": lambda m, x, **kw:
        layer_paths.multi_layer_integrated_gradients(m, [m[2]], x, target=1, steps=4, **kw),
    "internal_influence": lambda m, x, **kw: layer_paths.internal_influence(
        m, m[2], x, target=1, steps=4, **kw),
    "layer_conductance": lambda m, x, **kw: layer_paths.layer_conductance(
        m, m[2], x, target=1, steps=4, **kw)}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_budget_the_activations_fill_raises_after_one_row(name):
    model, x = _model(), torch.randn(8, 3, 16, 16)
    rows = []
    model[0].register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    with pytest.raises(MemoryError, match="layer activations of the 8 rows"):
        CALLS[name](model, x, max_memory="256KB")
    assert rows == [1]


@pytest.mark.parametrize("name", list(CALLS))
def test_a_budget_that_holds_them_gives_the_same_numbers(name):
    model, x = _model(), torch.randn(8, 3, 16, 16)
    free = CALLS[name](model, x).attributions
    got = CALLS[name](model, x, max_memory="16MB").attributions
    torch.testing.assert_close(got, free, rtol=1e-5, atol=1e-7)


def test_neuron_conductance_counts_the_layers_calls_on_one_row():
    """It captured the whole batch's activations only to count the layer's calls (1.8-2.5x
    of an 8 MB budget); one row counts them."""
    from taylor_kernels.attr.neuron import neuron_conductance
    model, x = _model(), torch.randn(8, 3, 16, 16)
    rows = []
    handle = model[0].register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    got = neuron_conductance(model, model[2], x, (1, 2, 3), target=1, steps=4,
                             max_memory="16MB").attributions
    assert rows[0] == 1
    handle.remove()
    torch.testing.assert_close(got, neuron_conductance(model, model[2], x, (1, 2, 3), target=1,
                                                       steps=4).attributions)


def test_a_neurons_cut_forward_counts_the_activation_it_ends_on():
    """A neuron's value read from a layer ends the forward there: the layer's activation (and
    the gradient into it) is held but not saved by autograd, so the per-point price must count
    it (it priced 0.3 MB per point where a point held 0.6 MB: 1.4-1.8x of 8-32 MB budgets)."""
    from taylor_kernels.attr.layer_capture import Layers
    from taylor_kernels.engine import memory
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(4, 32, 3, padding=1), nn.Tanh()).eval()
    spec = Layers(model[2], False)
    x = torch.randn(2, 3, 16, 16)
    spec.capture(model, (x,))  # the first capture counts the calls
    pts = x.clone().requires_grad_(True) * 1.0  # a point built by the path: not a leaf
    with memory.SavedBytes() as saved:
        act, = spec.capture(model, (pts,), grad=True)
    assert act.requires_grad
    assert saved.total >= act.numel() * act.element_size()
    with memory.SavedBytes() as outside:
        act, = spec.capture(model, (pts,))  # no graph: nothing to hold for a backward
    assert outside.total == 0
