"""The trace caches of the jet engine and the exact rule do not keep a deleted model's
weights alive (they did, until the LRU dropped the entry: up to 16 and 8 models), and a
repeated call is still served from the cache."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import taylor_kernels as tk
from taylor_kernels.engine import exact_path
from taylor_kernels.engine import jet as jet_engine

DT = torch.float64


def _model():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def _call(api, model, x):
    if api == "jet":
        return tk.jet(model, x, torch.ones(x.shape[0], 1, x.shape[1], dtype=DT), 2, target=1)
    if api == "mixed_partials":  # a new function object on every call, over the model
        return tk.mixed_partials(lambda z: model(z)[:, 1], x, [(0, 1), (2, 2)])
    return tk.integrated_gradients(model, x, target=1, rule="exact").attributions


@pytest.mark.parametrize("api", ["jet", "mixed_partials", "exact"])
def test_a_deleted_model_is_freed(api):
    model = _model()
    x = torch.randn(2, 5, dtype=DT)
    first = _call(api, model, x).detach()  # (a result with a graph holds the weights)
    torch.testing.assert_close(_call(api, model, x).detach(), first)  # (from the cache)
    weight = weakref.ref(model[0].weight)
    del model
    gc.collect()
    assert weight() is None, "a trace cache keeps the deleted model's weights alive"


def test_a_repeated_call_is_served_from_the_caches():
    model = _model()
    x = torch.randn(2, 5, dtype=DT)
    assert jet_engine._trace_cached(model)[1] is False
    assert jet_engine._trace_cached(model)[1] is True
    assert exact_path.trace(model, 1)[2] is False
    root, graph, cached = exact_path.trace(model, 1)
    assert cached and root.get_submodule("f.0") is model[0]
    same = _model()
    same.load_state_dict(model.state_dict())
    torch.testing.assert_close(_call("exact", model, x), _call("exact", same, x))


class _MakesAModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3).double()

    def forward(self, z):
        return nn.Tanh()(self.lin(z)).pow(2).sum(-1)  # a new module on every call


def test_a_module_made_in_the_forward_is_traced_again():
    """It dies with the first root; the next call traces again (same numbers)."""
    model = _MakesAModule()
    x = torch.randn(3, 5, dtype=DT)
    V = torch.randn(3, 2, 5, dtype=DT)
    first = tk.jet(model, x, V, 3)
    gc.collect()
    assert jet_engine._trace_cached(model)[1] is False  # (its cached root lost the module)
    torch.testing.assert_close(tk.jet(model, x, V, 3), first)
    torch.testing.assert_close(first, tk.jet(model, x, V, 3, cache=False))


def _closure_over(w):
    return lambda z: torch.relu(z @ w).sum(-1)  # w: a constant of the trace


@pytest.mark.parametrize("api", ["jet", "exact"])
def test_a_tensor_the_function_captured_is_freed_with_it(api):
    """FX makes a captured tensor a constant of the trace, held by its root only: the cache
    kept it (and, for a tensor with a graph, other models' weights) until the LRU dropped
    the entry; it goes when the function does."""
    w = torch.randn(5, 3, dtype=DT)
    f = _closure_over(w)
    x = torch.randn(2, 5, dtype=DT)
    if api == "jet":
        tk.jet(f, x, torch.ones(2, 1, 5, dtype=DT), 2)
    else:
        tk.integrated_gradients(f, x, rule="exact")
    captured = weakref.ref(w)
    del f, w
    gc.collect()
    assert captured() is None, "a trace cache keeps the function's captured tensor alive"
