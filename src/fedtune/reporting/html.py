"""A self-contained HTML page: inline CSS, no scripts, images linked by relative path (the
PNGs sit beside ``report.html``, so the folder can be moved, zipped or served as is)."""

from __future__ import annotations

import html
from typing import Any, Sequence

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.85rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; background: #eef7ee; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.85rem; }
pre { white-space: pre-wrap; margin: 0; font-family: inherit; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers with ``digits`` decimals, other values as text; None and NaN as a dash."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, best: dict[int, str] | None = None) -> str:
    """An HTML table. Numeric cells are right-aligned; ``best`` = {column: "min"|"max"}
    highlights the best value of those columns."""
    marks: dict[tuple[int, int], bool] = {}
    for col, how in (best or {}).items():
        values = [(r, row[col]) for r, row in enumerate(rows) if isinstance(row[col], (int, float)) and row[col] == row[col]]
        if values:
            target = (min if how == "min" else max)(v for _, v in values)
            marks.update({(r, col): True for r, v in values if v == target})
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for c, value in enumerate(row):
            classes = ["num"] if isinstance(value, (int, float)) else []
            if marks.get((r, c)):
                classes.append("best")
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{cls}>{value if isinstance(value, Raw) else esc(fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Raw(str):
    """Already-escaped HTML to put in a table cell as is."""


def pre(text: str) -> Raw:
    return Raw(f"<pre>{esc(text)}</pre>")


def figure(src: str, caption: str) -> str:
    return f'<figure><img src="{esc(src)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class=\"note\">{esc(subtitle)}</p>{''.join(sections)}</body></html>\n"
    )
