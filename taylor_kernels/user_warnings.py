"""Warnings attributed to the user's line: the call into ``taylor_kernels`` that led to them.

A fixed ``stacklevel`` points at whatever frame happens to sit that many levels up, which was
library code for most of the library's warnings (``integrated_gradients.py:189``,
``contextlib.py:81``). :func:`warn` walks the stack instead and names the frame that made the
outermost call into the package (``contextlib`` and Dynamo's ``torch.compiler.disable``
frames right above package frames count as the package's; in a thread the package started, the outermost package frame is named).
"""
from __future__ import annotations

import sys
import warnings

_PACKAGE = __name__.split(".")[0]


def _module(frame) -> str:
    return frame.f_globals.get("__name__", "")


def _ours(frame) -> bool:
    name = _module(frame)
    return name == _PACKAGE or name.startswith(_PACKAGE + ".")


def _wrapper(frame) -> bool:
    """A frame of the machinery right above a package frame that is the package's own call:
    a package context manager's exit (``contextlib``), the ``torch.compiler.disable`` wrapper
    of a public call (Dynamo's ``eval_frame``)."""
    name = _module(frame)
    return name == "contextlib" or name.startswith("torch._dynamo")


def _thread_start(frame) -> bool:
    """A frame of the machinery that starts a thread's work (no user line above it)."""
    name = _module(frame)
    return name == "threading" or name.startswith("concurrent.futures")


def user_stacklevel() -> int:
    """The ``stacklevel`` that :func:`warn` passes to :func:`warnings.warn`: 1 is ``warn``
    itself; the result is the level of the frame above the outermost package frame (with the
    wrapper frames right above a package frame, :func:`_wrapper`), or
    of that outermost frame when nothing but a thread's start is above it (a hook run by the
    autograd engine's own thread, a worker of the package's thread pool)."""
    frames, frame = [], sys._getframe(2)  # frames[i] is at level i + 2 (the caller of warn)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    outermost, below_ours = 0, True
    for i, frame in enumerate(frames):
        internal = _ours(frame) or (below_ours and _wrapper(frame))
        if internal:
            outermost = i
        below_ours = internal
    above = outermost + 1
    if above == len(frames) or _thread_start(frames[above]):
        return outermost + 2
    return above + 2


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """:func:`warnings.warn` at the user's line (:func:`user_stacklevel`)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
