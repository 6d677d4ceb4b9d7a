"""The library's warnings name the user's line (the call into ``taylor_kernels``), not library
code: a fixed ``stacklevel`` pointed at ``integrated_gradients.py``, ``contextlib.py`` or
``models/hf.py`` for most of them (found by a QA pass reading a new user's output)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

import taylor_kernels as tk


def _ours(caught):
    return [w for w in caught if "jit" not in str(w.message)]


def test_warnings_point_at_the_calling_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64) * 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tk.integrated_gradients(model, x, target=1, steps=2, tol=1e-9); line_ig = _line()  # noqa: E702
        tk.jet(lambda z: torch.special.erf(z).sum(1), x, x, 2); line_jet = _line()  # noqa: E702
    got = [(w.filename, w.lineno) for w in _ours(caught)]
    assert got == [(__file__, line_ig), (__file__, line_jet)], got


def _line() -> int:
    import sys
    return sys._getframe(1).f_lineno


def test_gap_warnings_name_low_precision():
    """A bf16 model's gap warnings advised more steps or the adaptive rule, which did not move
    a gap its rounding holds; they now say so (float32 models: unchanged)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(2, 3) * 20
    for dtype, named in ((torch.bfloat16, True), (torch.float32, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tk.integrated_gradients(model.to(dtype), x.to(dtype), target=1, steps=2, tol=1e-9)
        (w,) = _ours(caught)
        assert ("computes in bfloat16" in str(w.message)) is named


def _package_function(source: str, name: str):
    """A function compiled as a module of the package (file ``<pkg>``): what ``warn`` sees."""
    scope = {"__name__": "taylor_kernels._warning_probe"}
    exec(compile(source, "<pkg>", "exec"), scope)
    return scope[name]


def test_a_users_own_context_manager_is_not_skipped():
    """A call into the package inside the user's own ``@contextmanager`` is named at its line
    in the generator, not at the ``with`` that entered it (contextlib frames counted as the
    package's wherever they were)."""
    import contextlib

    emit = _package_function("from taylor_kernels.user_warnings import warn\n"
                             "def emit():\n    warn('probe')\n", "emit")
    lines = []

    @contextlib.contextmanager
    def mine():
        emit(); lines.append(_line())  # noqa: E702
        yield

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mine():
            pass
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, lines[0])]


def test_a_warning_in_a_package_thread_names_the_package_frame():
    """No user line is above a worker thread the package started: the warning names the
    package's outermost frame, not ``threading.py``."""
    import threading

    work = _package_function("from taylor_kernels.user_warnings import warn\n"
                             "def work():\n    warn('probe')\n", "work")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert [(w.filename, w.lineno) for w in caught] == [("<pkg>", 3)]
