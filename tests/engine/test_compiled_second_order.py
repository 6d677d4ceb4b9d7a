"""Second derivatives through ``torch.compile``d code: the compiled frames run eagerly inside
(torch.compile has no double backward: ``hessian`` raised "does not currently support
double backward", Integrated Hessians "compiled with non-empty donated buffers"), with one
warning, the caller's dynamo stance as it was after; compiled code the search does not find
gets an error saying what to do. ``aot_eager``: the same AOTAutograd refusal as inductor,
without its compile time."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import taylor_kernels as tk
from taylor_kernels.engine import compiled_code


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()


X = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))


def _stance() -> str:
    return torch._dynamo.eval_frame._stance.stance


def _compiled_module(m):
    return torch.compile(m, backend="aot_eager")


def _compile_called(m):
    m = _mlp()
    m.compile(backend="aot_eager")
    return m


@pytest.mark.parametrize("form", [_compiled_module, _compile_called])
def test_hessian_and_integrated_hessians_of_a_compiled_model(form):
    ref = _mlp()
    cm = form(_mlp())
    cm(X)  # compiled (first backward only)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        h = tk.hessian(lambda z: cm(z)[:, 0], X)
        ih = tk.integrated_hessians(cm, X, target=0, steps=4).interactions
    torch.testing.assert_close(h, tk.hessian(lambda z: ref(z)[:, 0], X), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ih, tk.integrated_hessians(ref, X, target=0, steps=4)
                               .interactions, rtol=1e-6, atol=1e-7)
    said = [w for w in seen if "torch.compile'd Sequential" in str(w.message)]
    assert len(said) <= 1 and (said or "Sequential" in compiled_code._said)
    assert _stance() == "default"


def test_a_compiled_function_and_one_in_a_closure():
    m = _mlp()
    f = torch.compile(lambda z: m(z)[:, 1], backend="aot_eager")
    f(X)
    ref = tk.hessian(lambda z: m(z)[:, 1], X)
    torch.testing.assert_close(tk.hessian(f, X), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tk.hessian(lambda z: f(z), X), ref, rtol=1e-6, atol=1e-7)
    assert _stance() == "default"


_GLOBAL_MODEL = _mlp()
_GLOBAL_F = torch.compile(lambda z: _GLOBAL_MODEL(z)[:, 2], backend="aot_eager")


def test_a_compiled_function_named_by_a_global():
    _GLOBAL_F(X)
    torch.testing.assert_close(tk.hessian(lambda z: _GLOBAL_F(z), X),
                               tk.hessian(lambda z: _GLOBAL_MODEL(z)[:, 2], X), rtol=1e-6,
                               atol=1e-7)


class _Holder:
    """An object the search does not look into, holding compiled code."""

    def __init__(self, fn):
        self.fn = fn


def test_compiled_code_not_found_gets_what_to_do():
    m = _mlp()
    holder = _Holder(torch.compile(lambda z: m(z)[:, 0], backend="aot_eager"))
    holder.fn(X)
    with pytest.raises(RuntimeError, match="set_stance\\('force_eager'\\)"):
        tk.hessian(lambda z: holder.fn(z), X)
    with torch.compiler.set_stance("force_eager"):
        got = tk.hessian(lambda z: holder.fn(z), X)
    torch.testing.assert_close(got, tk.hessian(lambda z: m(z)[:, 0], X), rtol=1e-6,
                               atol=1e-7)
    assert _stance() == "default"


def test_the_stance_is_restored_after_an_error():
    cm = _compiled_module(_mlp())
    cm(X)
    with pytest.raises(ValueError):
        tk.hessian(lambda z: cm(z)[:, 0], X, index=[99])
    assert _stance() == "default"
