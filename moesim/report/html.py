"""Assemble figures and tables into one self-contained HTML page (plotly.js inlined once)."""
from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

TEMPLATE = "plotly_white"
FIG_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "svg"}}

CSS = """
body { font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 2em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.sub { color: #666; margin-top: 0; }
.note { color: #666; font-size: 0.9em; margin: 0.3em 0 0.8em; }
table.kv, table.grid { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
table.kv td, table.grid td, table.grid th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
table.kv td:first-child { color: #555; } table.kv td:nth-child(2), table.grid td.num { text-align: right;
  font-variant-numeric: tabular-nums; }
table.grid th { background: #f6f6f6; position: sticky; top: 0; }
.scroll { max-height: 30em; overflow: auto; }
.failed { color: #b00; } .cols { display: flex; gap: 3em; flex-wrap: wrap; }
nav a { margin-right: 1em; }
"""


@dataclass
class Page:
    """A report page: a title and a list of sections, each with an optional figure/HTML."""

    title: str
    subtitle: str = ""
    parts: list[tuple[str, Any]] = field(default_factory=list)  # ("h2"|"html"|"note"|"fig", payload)

    def h2(self, text: str) -> None:
        self.parts.append(("h2", text))

    def note(self, text: str) -> None:
        self.parts.append(("note", text))

    def html(self, fragment: str) -> None:
        self.parts.append(("html", fragment))

    def fig(self, fig: go.Figure) -> None:
        self.parts.append(("fig", fig))

    @property
    def n_figures(self) -> int:
        return sum(1 for kind, _ in self.parts if kind == "fig")

    def render(self) -> str:
        body: list[str] = []
        first = True
        n = 0
        for kind, payload in self.parts:
            if kind == "h2":
                body.append(f"<h2>{html.escape(payload)}</h2>")
            elif kind == "note":
                body.append(f'<p class="note">{html.escape(payload)}</p>')
            elif kind == "html":
                body.append(payload)
            else:
                n += 1
                payload.update_layout(template=TEMPLATE)
                body.append(pio.to_html(payload, full_html=False, include_plotlyjs=first, div_id=f"fig-{n}",
                                        config=FIG_CONFIG, default_width="100%",
                                        default_height=f"{payload.layout.height or 450}px"))
                first = False
        sub = f'<p class="sub">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{html.escape(self.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
                f"<h1>{html.escape(self.title)}</h1>\n{sub}\n" + "\n".join(body) + "\n</body>\n</html>\n")

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        text = self.render()
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, p)
        finally:
            if tmp.exists():
                tmp.unlink()
        return p


def kv_table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{cells}</table>'


def grid_table(columns: list[str], rows: list[list[Any]], numeric: set[str] = frozenset(),
               row_class: list[str] | None = None, scroll: bool = True) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        tds = "".join(f'<td{" class=num" if c in numeric else ""}>{html.escape(str(v))}</td>'
                      for c, v in zip(columns, r))
        body.append(f"<tr{cls}>{tds}</tr>")
    t = f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return f'<div class="scroll">{t}</div>' if scroll else t


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: '-' for missing, thousands separators for big ints."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == int(x) and abs(x) < 1e15 and abs(x) >= 1:
            return f"{int(x):,}" if abs(x) >= 1e4 else f"{x:g}"
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
