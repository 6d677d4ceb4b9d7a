"""torch.fx traces (the jet engine's and the exact rule's) beside other threads.

FX replaces ``nn.Module.__call__`` and ``__getattr__`` process-wide while it traces: a plain
forward in another thread went through the library's tracer (``NameError: module is not
installed as a submodule``), and two interleaved traces could leave one's wrapper installed.
Deterministic: the other thread starts from inside the traced forward (its argument is then
an ``fx.Proxy``)."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import fx, nn

import taylor_kernels as tk

DT = torch.float64


class _Traced(nn.Module):
    """A ReLU MLP whose forward, when traced, runs ``during_trace`` first."""

    def __init__(self, during_trace=None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
        self.during_trace = during_trace

    def forward(self, x):
        if isinstance(x, fx.Proxy) and self.during_trace is not None:
            self.during_trace()
        return self.net(x)


def _run(api, model, x):
    if api == "jet":
        return tk.jet(model, x, torch.ones(x.shape[0], 1, x.shape[1], dtype=DT), 2, target=1)
    return tk.integrated_gradients(model, x, target=1, rule="exact").attributions


@pytest.mark.parametrize("api", ["jet", "exact"])
def test_a_plain_forward_in_another_thread_while_the_library_traces(api):
    other = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    z = torch.randn(3, 5, dtype=DT)
    expected = other(z)
    seen = {}

    def plain_forward():
        try:
            seen["out"] = other(z)
        except Exception as exc:  # noqa: BLE001 - reported below
            seen["error"] = exc

    def during_trace():
        if not seen:
            worker = threading.Thread(target=plain_forward)
            worker.start()
            worker.join()

    model = _Traced(during_trace)
    x = torch.randn(2, 5, dtype=DT)
    got = _run(api, model, x)
    assert "error" not in seen, f"the other thread's forward failed: {seen.get('error')!r}"
    torch.testing.assert_close(seen["out"], expected, rtol=0, atol=0)
    model.during_trace = None
    torch.testing.assert_close(got, _run(api, _Traced(seed=0), x))


@pytest.mark.parametrize("api", ["jet", "exact"])
def test_two_threads_tracing_at_once_leave_module_call_as_it_was(api):
    call_before = nn.Module.__dict__["__call__"]
    getattr_before = nn.Module.__dict__["__getattr__"]
    x = torch.randn(2, 5, dtype=DT)
    second = {}

    def second_call():
        try:
            second["out"] = _run(api, _Traced(seed=1), x)
        except Exception as exc:  # noqa: BLE001 - reported below
            second["error"] = exc

    worker = threading.Thread(target=second_call)

    def during_trace():  # the second trace starts while this one is open
        if not worker.is_alive() and not second:
            worker.start()
            worker.join(0.3)

    got = _run(api, _Traced(during_trace, seed=0), x)
    worker.join()
    assert nn.Module.__dict__["__call__"] is call_before
    assert nn.Module.__dict__["__getattr__"] is getattr_before
    assert "error" not in second, repr(second.get("error"))
    torch.testing.assert_close(got, _run(api, _Traced(seed=0), x))
    torch.testing.assert_close(second["out"], _run(api, _Traced(seed=1), x))
