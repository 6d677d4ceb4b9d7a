"""Aligned text tables, row errors and the JSON results file."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

Column = tuple[str, str, "str | Callable[[object], str]"]  # (row key, header, format)


def fmt_time(seconds) -> str:
    """Seconds with a unit that keeps 3 significant digits (``12.3 ms``)."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            return f"{seconds / scale:.3g} {unit}"
    return str(seconds)


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def one_line(text: str) -> str:
    """``text``'s non-blank lines joined by `` | ``: a multi-line message would break a table."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def error_text(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` of a failed row on one line, at most ``limit`` characters. A longer
    one loses its middle, not its end: a subprocess's message ends with the exception that
    says what went wrong."""
    text = one_line(f"{type(exc).__name__}: {exc}")
    if len(text) <= limit:
        return text
    head = limit // 4
    return f"{text[:head]} ... {text[len(text) - (limit - head - 5):]}"


def _cell(value, fmt) -> str:
    if value is None:
        return "-"
    if callable(fmt):
        return fmt(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and fmt:
        return format(value, fmt)
    return one_line(value)


def format_table(title: str, rows: Sequence[dict], columns: Sequence[Column],
                 notes: Sequence[str] = ()) -> str:
    """``title``, a header line and one aligned line per row (numbers right-aligned)."""
    header = [h for _, h, _ in columns]
    cells = [[_cell(r.get(k), f) for k, _, f in columns] for r in rows]
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows)
               for k, _, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [f"== {title} ==", line(header), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    out += [f"  note: {n}" for n in notes]
    return "\n".join(out)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def iter_rows(result) -> Iterator[dict]:
    """Every row of a family's result (or of a whole results file): the dicts inside lists,
    at any depth (``path_ops`` nests its rows in cases)."""
    if isinstance(result, dict):
        for value in result.values():
            yield from iter_rows(value)
    elif isinstance(result, list):
        for item in result:
            if isinstance(item, dict):
                yield item
            yield from iter_rows(item)


def failed_rows(result) -> list[dict]:
    """The rows whose measurement failed: an ``error`` and no ``skipped`` (a case left out for
    a missing optional package is not a failure)."""
    return [r for r in iter_rows(result) if "error" in r and not r.get("skipped")]


def write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and a rename: an interrupt mid-write leaves the previous
    complete file, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)
