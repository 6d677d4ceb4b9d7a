"""The jet engine's and the exact rule's trace LRU: hits only for the same live owner in the
same state, least recently used dropped first."""
from __future__ import annotations

import gc
import weakref

from taylor_kernels.engine.trace_cache import MISS, TraceCache


class _Owner:
    pass


def test_hits_need_the_same_owner_and_state():
    cache, a, b = TraceCache(4), _Owner(), _Owner()
    cache.store("k", weakref.ref(a), ("s", 1), "trace-a")
    assert cache.lookup("k", a, ("s", 1)) == "trace-a"
    assert cache.lookup("k", a, ("s", 2)) is MISS   # the forward's state changed
    assert cache.lookup("k", b, ("s", 1)) is MISS   # another object under the same key (an id)
    assert cache.lookup("other", a, ("s", 1)) is MISS
    del a
    gc.collect()
    assert "k" in cache and cache.lookup("k", None, ("s", 1)) is MISS  # the owner died


def test_the_least_recently_used_entry_goes_first():
    owners = [_Owner() for _ in range(4)]
    cache = TraceCache(3)
    for i in range(3):
        cache.store(i, weakref.ref(owners[i]), None, i)
    assert cache.lookup(0, owners[0], None) == 0  # 0 used: 1 is now the oldest
    cache.store(3, weakref.ref(owners[3]), None, 3)
    assert [k in cache for k in range(4)] == [True, False, True, True]
    cache.clear()
    assert not any(k in cache for k in range(4))
