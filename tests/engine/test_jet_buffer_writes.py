"""A forward that writes its buffers (a call counter) through the jet's nested-forward-mode
fallback: torch.func refused it ("would mutate a captured Tensor"), so jet, mixed_partials and
taylor_decomposition failed on such a model where it could not be traced. They now run it on
copies of the buffers (float64 against the same model without the write); a written tensor
that is no buffer is named."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import taylor_kernels as tk

DT = torch.float64


class Counting(nn.Module):
    """tanh(W x + c) with a data-dependent branch (no FX trace: the whole forward falls back)
    and, with ``hooked``, a forward hook on the inner layer (that one module falls back)."""

    def __init__(self, write=True, hooked=False):
        super().__init__()
        self.inner = Inner(write)
        self.register_buffer("calls", torch.zeros((), dtype=DT))
        self.write, self.hooked = write, hooked
        if hooked:
            self.inner.register_forward_hook(lambda m, a, out: out)

    def forward(self, x):
        if self.write:
            self.calls += 1
        h = self.inner(x)
        if not self.hooked and h.sum() > -1e30:  # (a branch on a value: not traceable)
            h = torch.tanh(h)
        return torch.sin(h)


class Inner(nn.Module):
    def __init__(self, write):
        super().__init__()
        self.lin = nn.Linear(4, 3).to(DT)
        self.register_buffer("seen", torch.zeros((), dtype=DT))
        self.write = write

    def forward(self, x):
        if self.write:
            self.seen.add_(1)
        return self.lin(x) * 0.7


CALLS = {
    "jet": lambda m, x, v: tk.jet(m, x, v, order=3, target=1),
    "mixed_partials": lambda m, x, v: tk.mixed_partials(m, x, [0, 2, 3], target=1),
    "taylor_decomposition": lambda m, x, v: vars(tk.taylor_decomposition(m, x, None, target=1)),
}


@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.parametrize("api", sorted(CALLS))
def test_jets_of_a_forward_writing_its_buffers(api, hooked):
    torch.manual_seed(0)
    writing, plain = Counting(hooked=hooked), Counting(write=False, hooked=hooked)
    plain.load_state_dict(writing.state_dict())
    x, v = torch.randn(2, 4, dtype=DT), torch.randn(2, 5, 4, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the fallback's own warning)
        got, ref = CALLS[api](writing, x, v), CALLS[api](plain, x, v)
    got, ref = (got if isinstance(got, dict) else {0: got}), (ref if isinstance(ref, dict)
                                                             else {0: ref})
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-12)
    assert any(isinstance(r, torch.Tensor) and r.abs().max() > 1e-3 for r in ref.values())
    # the writes outside the transform (checks, probes) reach the caller's buffers, the
    # transform's own land on copies: the counters are whole numbers, not lost tensors
    assert writing.calls.item() >= 1 and writing.calls.item() == int(writing.calls.item())
    assert all(b.device.type == "cpu" and b.dim() == 0 for b in writing.buffers())


def test_a_written_tensor_that_is_no_buffer_is_named():
    torch.manual_seed(0)
    lin, counter = nn.Linear(4, 3).to(DT), torch.zeros((), dtype=DT)

    def f(x):
        counter.add_(1)
        h = lin(x)
        return torch.tanh(h) if h.sum() > -1e30 else h

    x, v = torch.randn(2, 4, dtype=DT), torch.randn(2, 3, 4, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RuntimeError, match="not a buffer of the model's modules"):
            tk.jet(f, x, v, order=2, target=0)
