"""The demo's HTML page: a summary, the figures, and one table row per (example, method)."""
from __future__ import annotations

import html
import os
from pathlib import Path


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(path: Path, title: str, intro: list[str], sections: list[dict]) -> Path:
    """Write ``path``: ``intro`` paragraphs, then per section its ``heading``, optional
    ``text``, ``figures`` (PNG paths, linked relative to the page) and ``table``
    (``{"headers": [...], "rows": [[...]]}``)."""
    parts = [f"<h1>{html.escape(title)}</h1>"] + [f"<p>{html.escape(p)}</p>" for p in intro]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec['heading'])}</h2>")
        if sec.get("text"):
            parts.append(f"<p>{html.escape(sec['text'])}</p>")
        for fig in sec.get("figures", []):
            rel = os.path.relpath(fig, path.parent)
            parts.append(f'<p><img src="{html.escape(rel)}" alt="{html.escape(rel)}" '
                         'style="max-width:100%"></p>')
        if sec.get("table"):
            parts.append(_table(sec["table"]["headers"], sec["table"]["rows"]))
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
             "table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>"
                    f"{html.escape(title)}</title><style>{style}</style></head><body>"
                    + "\n".join(parts) + "</body></html>\n")
    return path
