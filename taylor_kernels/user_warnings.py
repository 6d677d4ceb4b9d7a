"""Warnings attributed to the user's line: the call into ``taylor_kernels`` that led to them.

A fixed ``stacklevel`` points at whatever frame happens to sit that many levels up, which was
library code for most of the library's warnings (``integrated_gradients.py:189``,
``contextlib.py:81``). :func:`warn` walks the stack instead and names the frame that made the
outermost call into the package (``contextlib`` frames between count as the package's).
"""
from __future__ import annotations

import sys
import warnings

_PACKAGE = __name__.split(".")[0]


def _internal(frame) -> bool:
    name = frame.f_globals.get("__name__", "")
    return name == _PACKAGE or name.startswith(_PACKAGE + ".") or name == "contextlib"


def user_stacklevel() -> int:
    """The ``stacklevel`` that :func:`warn` passes to :func:`warnings.warn`: 1 is ``warn``
    itself; the result is the level of the frame above the outermost package (or
    ``contextlib``) frame, or of that outermost frame when nothing is above it (a hook run
    by the autograd engine's own thread)."""
    frame, level, outermost = sys._getframe(2), 2, 2  # (2: the caller of warn)
    while frame is not None:
        if _internal(frame):
            outermost = level
        frame, level = frame.f_back, level + 1
    return outermost + 1 if outermost + 1 < level else outermost


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """:func:`warnings.warn` at the user's line (:func:`user_stacklevel`)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
