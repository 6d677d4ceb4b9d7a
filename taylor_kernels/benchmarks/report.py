"""Aligned text tables and the JSON results file."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

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


def _cell(value, fmt) -> str:
    if value is None:
        return "-"
    if callable(fmt):
        return fmt(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and fmt:
        return format(value, fmt)
    return str(value)


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


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
