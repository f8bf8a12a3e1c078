"""A minimal, readable, self-contained HTML report builder, and CSV table helpers.

    from steerlab.report.html import HtmlReport
    from steerlab.runs import write_csv
    write_csv(run / "tables" / "tox.csv", rows)            # rows: list of dicts
    page = HtmlReport("Self-correction study")
    page.heading("Headline").kv({"rounds": 3, "mean toxicity, round 1": 0.41})
    page.figure(run / "figures" / "tox.png", "Toxicity per round")
    page.table_csv(run / "tables" / "tox.csv")
    page.write(run / "report.html")

PNG figures are embedded as base64 data URIs, so ``report.html`` can be moved or mailed alone.
Every piece of text is HTML-escaped.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ccc;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em}
h3{font-size:1.05em}table{border-collapse:collapse;margin:.6em 0;font-size:.86em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.t,th.t{text-align:left}tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em;white-space:pre-wrap}
.note{color:#555;font-size:.9em}details{margin:.5em 0}
"""


def fmt(v: Any, digits: int = 4) -> str:
    """A cell value as text: floats to ``digits`` significant digits, None as empty."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}g}"
    return str(v)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _is_num(s: Any) -> bool:
    if isinstance(s, int | float) and not isinstance(s, bool):
        return True
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


class HtmlReport:
    """Build a page piece by piece (methods chain), then :meth:`write` it."""

    def __init__(self, title: str, subtitle: str | None = None, base_dir: str | Path | None = None):
        """``base_dir``: the folder the report will be written to (links to files are made relative to it)."""
        self.title = title
        self._base = Path(base_dir) if base_dir is not None else None
        self.parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]
        if subtitle:
            self.parts.append(f'<p class="note">{html.escape(subtitle)}</p>')

    def heading(self, text: str, level: int = 2) -> HtmlReport:
        level = min(max(level, 2), 4)
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
        return self

    def paragraph(self, text: str, note: bool = False) -> HtmlReport:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def bullets(self, items: Sequence[str]) -> HtmlReport:
        self.parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
        return self

    def kv(self, pairs: Mapping[str, Any], digits: int = 4) -> HtmlReport:
        """A two-column table of named values (headline numbers)."""
        rows = "".join(f'<tr><th class="t">{html.escape(str(k))}</th><td class="t">{html.escape(fmt(v, digits))}</td></tr>'
                       for k, v in pairs.items())
        self.parts.append(f"<table>{rows}</table>")
        return self

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, caption: str | None = None,
              max_rows: int | None = 200, digits: int = 4) -> HtmlReport:
        """A table of dict rows; numbers are right-aligned and rounded, text left-aligned."""
        if columns is None:
            columns = []
            for r in rows:
                columns += [k for k in r if k not in columns]
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = []
        shown = rows if max_rows is None else rows[:max_rows]
        for r in shown:
            cells = []
            for c in columns:
                v = r.get(c)
                if isinstance(v, str) and _is_num(v) and v.strip() != "":
                    v = float(v) if any(ch in v for ch in ".eE") or v.strip().lower() == "nan" else int(v)
                cls = "" if _is_num(v) else ' class="t"'
                cells.append(f"<td{cls}>{html.escape(fmt(v, digits))}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        more = (f'<p class="note">{len(rows) - len(shown)} more rows in the CSV file.</p>'
                if max_rows is not None and len(rows) > max_rows else "")
        self.parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}")
        return self

    def table_csv(self, path: str | Path, caption: str | None = None, columns: Sequence[str] | None = None,
                  max_rows: int | None = 200, link: bool = True) -> HtmlReport:
        """A CSV file as a table, with a link to the file (relative to the report when possible)."""
        path = Path(path)
        self.table(read_csv(path), columns, caption, max_rows)
        if link:
            self.parts.append(f'<p class="note">CSV: <a href="{html.escape(self._rel(path))}">'
                              f"{html.escape(path.name)}</a></p>")
        return self

    def figure(self, path: str | Path, caption: str | None = None) -> HtmlReport:
        """Embed a PNG (base64) with a caption."""
        path = Path(path)
        data = base64.b64encode(path.read_bytes()).decode()
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img alt="{html.escape(caption or path.name)}" '
                          f'src="data:image/png;base64,{data}">{cap}</figure>')
        return self

    def pre(self, text: str, summary: str | None = None) -> HtmlReport:
        """Preformatted text; with ``summary``, folded in a ``<details>`` element."""
        block = f"<pre>{html.escape(text)}</pre>"
        if summary:
            block = f"<details><summary>{html.escape(summary)}</summary>{block}</details>"
        self.parts.append(block)
        return self

    def raw(self, html_text: str) -> HtmlReport:
        """Append HTML as is (the caller escapes)."""
        self.parts.append(html_text)
        return self

    def _rel(self, path: Path) -> str:
        if self._base is not None:
            try:
                return str(path.resolve().relative_to(self._base.resolve()))
            except ValueError:
                pass
        return str(path)

    def render(self) -> str:
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>\n"
                + "\n".join(self.parts) + "\n</body></html>\n")

    def write(self, path: str | Path) -> Path:
        from ..runs import write_atomic

        return write_atomic(path, self.render().encode("utf-8"))
