"""Which kernel backend runs each op, and a way to force one.

Backends: ``reference`` (pure PyTorch, any device), ``cpp`` (C++/OpenMP, CPU tensors),
``cuda`` (CUDA C++, CUDA tensors), ``triton`` (CUDA tensors; CPU tensors only under
``TRITON_INTERPRET=1``). ``auto`` picks by device: CPU -> cpp, else reference; CUDA -> the
op's measured choice in :mod:`taylor_kernels.backend_table` if any, else cuda, else triton,
else reference. The environment variable ``TAYLOR_KERNELS_BACKEND`` sets the
initial process default; :func:`use` changes the process default at run time.

:func:`using` (and every ``backend=`` argument) forces a backend through a
:class:`contextvars.ContextVar`: the choice is seen only by the thread or asyncio task that made
it (a task inherits its creator's choice at creation), never by other threads or tasks, and is
undone when the block exits. Threads start without an override, so they see the process default.
Autograd's own device threads (the backward of CUDA tensors) also see the process default.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os

import torch

from taylor_kernels import _native, backend_table

NAMES = ("reference", "cpp", "cuda", "triton")
ENV_VAR = "TAYLOR_KERNELS_BACKEND"
_default = {"name": os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"}
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "taylor_kernels_backend", default=None)


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:  # cached: find_spec stats the file system on every call
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here, or None.

    Triton 3.6's interpreter turns a tensor loop bound into a Python int with ``int(array)``
    on a 1-element array, which NumPy 2.4 refuses (Triton 3.7 squeezes first): every kernel
    with a runtime loop bound fails there. Compiled (GPU) kernels are not affected."""
    import numpy
    import triton
    from torch.torch_version import TorchVersion

    if TorchVersion(triton.__version__) < "3.7" and TorchVersion(numpy.__version__) >= "2.4":
        return (f"Triton {triton.__version__}'s CPU interpreter cannot run with NumPy "
                f"{numpy.__version__} (it converts 1-element arrays to int, which NumPy 2.4 "
                "refuses): install numpy<2.4 or triton>=3.7")
    return None


def available() -> dict[str, bool]:
    """Which backends are built/installed here (no device is queried)."""
    return {"reference": True, "cpp": _native.has_cpp(), "cuda": _native.has_cuda_kernels(),
            "triton": _triton_installed()}


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name (str), got {type(name).__name__} {name!r}")
    name = name.strip().lower()
    if name not in NAMES + ("auto",):
        raise ValueError(f"unknown backend {name!r}; choose one of {NAMES + ('auto',)}")
    return name


def _checked_available(name: str) -> str:
    name = _check_name(name)
    if name != "auto" and not available()[name]:
        reason = _native.LOAD_ERROR or "not built" if name in ("cpp", "cuda") else "not installed"
        raise RuntimeError(f"backend {name!r} is not available here ({reason}); "
                           f"available: {[k for k, v in available().items() if v]}")
    return name


def use(name: str) -> None:
    """Set the process default backend for every op (``'auto'`` restores the per-device
    choice). Threads and tasks inside a :func:`using` block keep the block's backend."""
    _default["name"] = _checked_available(name)


def current() -> str:
    """The backend forced in this thread/task by :func:`using`, else the process default
    (a name, or ``'auto'``)."""
    forced = _override.get()
    if forced is not None:
        return _check_name(forced)
    try:
        return _check_name(_default["name"])
    except ValueError as exc:  # (use() checks its names: a bad default came from the variable)
        raise ValueError(f"{exc} (the process default comes from the environment variable "
                         f"{ENV_VAR}={os.environ.get(ENV_VAR)!r})") from None


@contextlib.contextmanager
def using(name: str):
    """Force backend ``name`` in the current thread or asyncio task (a ContextVar) for the
    block; other threads and tasks, and the process default, are unaffected."""
    token = _override.set(_checked_available(name))
    try:
        yield
    finally:
        _override.reset(token)


def selected(name: str | None):
    """:func:`using` ``name``, or no change for None (the ``backend=`` argument of every
    attribution call)."""
    return contextlib.nullcontext() if name is None else using(name)


def runs_on(name: str, device: torch.device | str) -> bool:
    """Whether backend ``name`` (as :func:`use` reads it; ``'auto'`` always finds one) can
    run on tensors of ``device`` (a device or its name)."""
    name, device = _check_name(name), torch.device(device)
    if name == "auto":
        return True
    if not available()[name]:
        return False
    if name == "reference":
        return True
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted()
                                      and triton_interpreter_problem() is None)


def unavailable_reason(name: str, device: torch.device) -> str:
    """Why backend ``name`` cannot run on ``device`` tensors (for error messages)."""
    if name == "triton" and device.type == "cpu" and available()["triton"]:
        if not triton_interpreted():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        return triton_interpreter_problem()
    return f"available: {[k for k, v in available().items() if v]}"


def transformed(*tensors: torch.Tensor) -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``jvp``, ``vmap``...) or forward-mode AD
    (``torch.autograd.forward_ad``) sees one of ``tensors``. The compiled ops carry backward
    formulas only (a custom op takes no forward-mode rule: its tangent came out zero, silently,
    and ``torch.func.grad`` refused it), so the ``tk.ops`` wrappers then run the reference
    composite: the same values, with every transform's derivatives. Not checked while
    ``torch.compile`` traces (its graph holds the plain op)."""
    if torch.compiler.is_compiling():
        return False
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return any(isinstance(t, torch.Tensor) and (
        (wrapped is not None and wrapped(t)) or
        torch.autograd.forward_ad.unpack_dual(t).tangent is not None) for t in tensors)


def resolve_for(op: str, *tensors: torch.Tensor) -> str:
    """The backend op ``op`` on ``tensors`` uses now: ``"reference"`` under a transform
    (:func:`transformed`), else :func:`resolve` on the first tensor's device."""
    if transformed(*tensors):
        return "reference"
    return resolve(tensors[0].device, op)


def _compiling() -> bool:
    """Whether ``torch.compile`` is tracing. torch 2.11 runs :func:`resolve` (an
    ``assume_constant_result`` function) with ``is_compiling()`` still False while Dynamo
    traces; its tracing context is set then on every supported version."""
    return torch.compiler.is_compiling() or torch._guards.TracingContext.try_get() is not None


@torch.compiler.assume_constant_result
def resolve(device: torch.device, op: str | None = None) -> str:
    """The backend an op on ``device`` uses now; raises if a forced one cannot run there.
    Under ``auto`` on CUDA, op ``op`` takes the measured choice of :mod:`.backend_table`.

    Under ``torch.compile`` the choice is made once, when the graph is traced, and kept in
    it (the ``tk.ops.*`` wrappers then trace with ``fullgraph=True``): a later
    :func:`using`/:func:`use` reaches a compiled function only after ``torch._dynamo.reset()``
    (all backends compute the same values, to rounding)."""
    name = current()
    if name != "auto":
        if not runs_on(name, device):
            raise RuntimeError(f"backend {name!r} cannot run on {device.type} tensors "
                               f"({unavailable_reason(name, device)})")
        if name == "triton" and device.type == "cpu" and _compiling():
            raise RuntimeError("backend 'triton' runs CPU tensors in Triton's interpreter, "
                               "which cannot run inside torch.compile (it read the tracer's "
                               "placeholder tensors); compile with backend 'cpp' or "
                               "'reference' there, or run Triton on a GPU")
        return name
    if op is not None and device.type == "cuda":
        measured = backend_table.choice(op, device)
        if measured is not None and runs_on(measured, device):
            return measured
    order = ("cpp", "reference") if device.type == "cpu" else ("cuda", "triton", "reference")
    return next(n for n in order if runs_on(n, device))
