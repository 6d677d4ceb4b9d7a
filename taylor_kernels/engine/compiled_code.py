"""Second derivatives of ``torch.compile``d models: run the compiled code eagerly.

AOTAutograd compiles a first backward only: a Hessian-vector product through a compiled
model (``torch.compile(model)``, ``model.compile()``, a compiled function) failed with
torch's "torch.compile with aot_autograd does not currently support double backward" or
"This backward function was compiled with non-empty donated buffers" (``hessian``, Integrated
Hessians). Inside :func:`compiled_runs_eager` dynamo's stance is ``"force_eager"``: compiled
frames run their original Python code (the same function), so second and higher derivatives
work. The stance is the process's, not the thread's: overlapping blocks of several threads
share one setting (:class:`~taylor_kernels.shared_setting.SharedSetting`), and compiled
models that other threads run meanwhile run eagerly too (the same numbers, their speed).
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable

import torch
from torch import nn

from taylor_kernels.engine import guards
from taylor_kernels.shared_setting import SharedSetting
from taylor_kernels.user_warnings import warn

_DOUBLE_BACKWARD_REFUSED = re.compile(r"does not currently support double backward|"
                                      r"compiled with non-empty donated buffers")
_said: set[str] = set()


def _force_eager_setting() -> SharedSetting:
    block: list = []

    def apply() -> None:
        block.append(torch.compiler.set_stance("force_eager"))
        block[-1].__enter__()

    return SharedSetting(apply, lambda: block.pop().__exit__(None, None, None))


_FORCE_EAGER = _force_eager_setting()


def _compiled(v) -> bool:
    """Whether ``v`` is compiled code: an ``OptimizedModule``, a module whose ``compile()``
    ran, or a function ``torch.compile`` returned."""
    if isinstance(v, nn.Module):
        return type(v).__name__ == "OptimizedModule" or \
            getattr(v, "_compiled_call_impl", None) is not None
    return getattr(v, "_torchdynamo_orig_callable", None) is not None


def compiled_parts(f: Callable | None) -> list[str]:
    """Names (class or function names) of the compiled code ``f`` reaches: the functions and
    modules :func:`~taylor_kernels.engine.guards.reached` finds, and the modules' submodules."""
    if f is None:
        return []
    found = []
    for v in guards.reached(f):
        for part in v.modules() if isinstance(v, nn.Module) else (v,):
            if _compiled(part):
                inner = getattr(part, "_orig_mod", part)
                found.append(type(inner).__name__ if isinstance(inner, nn.Module)
                             else getattr(inner, "__name__", type(inner).__name__))
    return found


@contextlib.contextmanager
def compiled_runs_eager(f: Callable | None):
    """Context for second and higher derivatives of ``f``: when it reaches compiled code
    (:func:`compiled_parts`), dynamo's stance is ``"force_eager"`` inside (said once per
    compiled part). A double backward that compiled code the search did not find refused is
    raised again with what to do."""
    parts = [] if torch.compiler.is_compiling() else compiled_parts(f)
    for name in parts:
        if name not in _said:
            _said.add(name)
            warn(f"second-order attribution (or create_graph=True) through torch.compile'd "
                 f"{name}: it runs eagerly (its original code) in these calls, as "
                 "torch.compile has no double backward", RuntimeWarning)
    try:
        with _FORCE_EAGER() if parts else contextlib.nullcontext():
            yield
    except RuntimeError as exc:
        if parts or not _DOUBLE_BACKWARD_REFUSED.search(str(exc)):
            raise
        raise RuntimeError("the model runs torch.compile'd code that second derivatives "
                           "cannot go through (torch.compile has no double backward), which "
                           "this call did not find to run eagerly: call it inside `with "
                           "torch.compiler.set_stance('force_eager'):`, or pass the "
                           "uncompiled model") from exc
