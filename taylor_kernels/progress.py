"""Progress bars for long work: a tqdm bar when asked for, else a silent stand-in (a disabled
tqdm bar still starts tqdm's monitor thread, which then runs for the rest of the process)."""
from __future__ import annotations

from typing import Iterable

from tqdm.auto import tqdm


class _Silent:
    """What the loops use of a tqdm bar (iteration, ``update``, a ``with`` block), doing
    nothing."""

    def __init__(self, iterable: Iterable | None) -> None:
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def progress_bar(enabled: bool, iterable: Iterable | None = None, **kwargs):
    """``tqdm(iterable, **kwargs)`` when ``enabled``, else a silent stand-in."""
    return tqdm(iterable, **kwargs) if enabled else _Silent(iterable)
