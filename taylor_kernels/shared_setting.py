"""Process-wide settings that calls in several threads share (torch's SDPA backend flags, the
warnings filters): the first of overlapping blocks applies the setting, the last one out undoes
it. (A context manager that saves and restores a snapshot, such as ``sdpa_kernel`` or
``warnings.catch_warnings``, run by two threads whose blocks overlap, restores one thread's
snapshot inside the other's block: the setting outlived both, or another thread's change was
undone.)"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable


class SharedSetting:
    """``with setting():`` blocks, in any thread and any order, during which ``apply()`` holds:
    called when the first block enters, ``undo()`` when the last one leaves."""

    def __init__(self, apply: Callable[[], None], undo: Callable[[], None]) -> None:
        self._apply, self._undo = apply, undo
        self._lock = threading.Lock()
        self._users = 0

    @contextlib.contextmanager
    def __call__(self):
        with self._lock:
            if self._users == 0:
                self._apply()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._undo()
