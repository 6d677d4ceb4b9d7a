"""memory.SavedBytes: counts what autograd saves, keeps no reference cycle, and leaves the
graph usable (also for double backward)."""
import gc
import weakref

import torch

import taylor_kernels as tk
from taylor_kernels.engine import memory
from tests import models


def test_a_graph_never_run_backward_is_freed():
    """``tanh`` saves its own output: a pack hook returning that tensor formed a cycle through
    C++ which the collector cannot see, so a forward-only probe leaked its activations."""
    x = torch.randn(4, 8, requires_grad=True)
    with memory.SavedBytes() as saved:
        y = torch.tanh(x * 2)
    assert saved.total >= y.nbytes
    ref = weakref.ref(y)
    del y
    gc.collect()
    assert ref() is None


def test_saved_tensors_unpack_for_double_backward():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with memory.SavedBytes():
        y = torch.tanh(x).sum()
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    t = torch.tanh(x.detach())
    torch.testing.assert_close(g.detach(), 1 - t**2)
    torch.testing.assert_close(h, -2 * t * (1 - t**2))


def _live_tensors() -> int:
    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def test_calls_under_a_budget_leave_no_tensors_behind():
    """The endpoint forwards' probe under ``max_memory`` runs no backward (3 tensors leaked
    per call on a tanh model)."""
    model = models.mlp(dtype=torch.float32)
    x = torch.randn(3, 10)
    for _ in range(2):
        tk.integrated_gradients(model, x, target=1, steps=8, max_memory="2MB")
    before = _live_tensors()
    for _ in range(5):
        tk.integrated_gradients(model, x, target=1, steps=8, max_memory="2MB")
    assert _live_tensors() <= before


def test_a_double_backward_does_not_count_the_weights_it_saves():
    """The first backward's graph saves ``W.t()`` of each weight, not marked as a view of
    it: counted, one HVP row of a 784-256-10 MLP was 2.5 MB of "saved" bytes against the few
    KB it takes, and every second-order API refused budgets under ~3 MB."""
    net = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.Tanh(),
                              torch.nn.Linear(256, 10))
    x = torch.randn(1, 784, requires_grad=True)
    with memory.SavedBytes() as saved:
        (g,) = torch.autograd.grad(net(x)[:, 3].sum(), x, create_graph=True)
        (g * torch.randn_like(x)).sum()
    weights = sum(p.nbytes for p in net.parameters())
    assert 0 < saved.total < weights / 20, (saved.total, weights)
