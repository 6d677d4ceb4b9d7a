"""A small thread-safe LRU of ``torch.fx`` traces, keyed per traced function or model.

The jet engine (16 entries) and the exact rule (8) keep one trace per function so that a
repeated call skips ``torch.fx``. An entry holds its owner by weak reference (usually a
:meth:`~taylor_kernels.engine.held_root.HeldRoot.released_with` reference, which also empties
the entry's root when the owner dies), the state the trace was made under (the modules' trees,
closure cells and globals a forward reads), and the trace. A lookup hits only for the same
owner (an ``id`` reused by a new object misses) in the same state.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

MISS = object()  # what :meth:`TraceCache.lookup` returns when there is no usable entry


class TraceCache:
    """LRU of ``key -> (weak owner, state, trace)`` holding at most ``size`` entries."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[object, tuple[weakref.ref, object, object]] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, key, owner, state):
        """The trace stored under ``key`` for this ``owner`` and ``state`` (made most recently
        used), else :data:`MISS`."""
        with self._lock:
            hit = self._entries.get(key)
            live = None if hit is None else hit[0]()
            if live is None or live is not owner or hit[1] != state:
                return MISS
            self._entries.move_to_end(key)
            return hit[2]

    def store(self, key, owner_ref: weakref.ref, state, trace) -> None:
        """Keep ``trace`` under ``key`` (most recently used), dropping the oldest entries."""
        with self._lock:
            self._entries[key] = (owner_ref, state, trace)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._entries
