"""Progress bars for long work: a tqdm bar when asked for, else a silent stand-in (a disabled
tqdm bar still starts tqdm's monitor thread, which then runs for the rest of the process).

tqdm is imported only when a bar is drawn: the library imports and runs without it while
bars are off (the default)."""
from __future__ import annotations

from typing import Iterable


def tqdm(iterable: Iterable | None = None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, imported at the call (``ImportError`` naming
    ``pip install tqdm`` when it is missing)."""
    try:
        from tqdm.auto import tqdm as bar
    except ImportError as exc:
        raise ImportError("progress=True draws a tqdm bar, and tqdm is not installed: "
                          "pip install tqdm, or pass progress=False") from exc
    return bar(iterable, **kwargs)


class _Silent:
    """What the callers use of a tqdm bar (iteration, ``update``, ``total``, postfix and
    description, a ``with`` block), doing nothing."""

    def __init__(self, iterable: Iterable | None, total: int | None = None) -> None:
        self.iterable = iterable
        self.total = total

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
        pass

    def refresh(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def progress_bar(enabled: bool, iterable: Iterable | None = None, **kwargs):
    """``tqdm(iterable, **kwargs)`` when ``enabled``, else a silent stand-in; ``TypeError``
    unless ``enabled`` is a bool (``progress="no"`` drew a bar)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"progress must be True or False, got {type(enabled).__name__} "
                        f"{enabled!r}")
    return tqdm(iterable, **kwargs) if enabled else _Silent(iterable, kwargs.get("total"))


def extend(bar, count: int) -> None:
    """Add ``count`` items to ``bar``'s total, for work whose size shows as it goes (the
    adaptive rule's next level, the greedy search's next order): one bar for the whole call,
    ending at its final count."""
    bar.total = (bar.total or 0) + count
    bar.refresh()
