"""A self-contained HTML report of attribution results (inline CSS, no scripts or external assets); imports only
``airtrace.data``.

Per query: its question and answer, then a table of the top training pairs with
rank, score, a bar proportional to ``|score| / max |score|`` of that query
(red for negative scores), category, question and answer. All text is escaped.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from airtrace.data import Pair

Ranked = Sequence[tuple[Pair, float]]
"""Top training pairs of one query with their scores, best first."""

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.bar { width: 8em; background: #eee; } .bar div { height: 0.9em; background: #3a7bd5; }
.bar div.neg { background: #d5533a; }
.query { background: #f6f8fa; padding: 0.6em 1em; border-left: 4px solid #3a7bd5; }
.settings td:first-child { font-weight: 600; white-space: nowrap; }
.cat { color: #666; white-space: nowrap; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _bar(score: float, scale: float) -> str:
    width = 100.0 * abs(score) / scale if scale > 0 else 0.0
    cls = ' class="neg"' if score < 0 else ""
    return f'<td class="bar"><div{cls} style="width:{width:.1f}%"></div></td>'


def _query_section(number: int, query: Pair, ranked: Ranked) -> str:
    scale = max((abs(score) for _, score in ranked), default=0.0)
    rows = "\n".join(
        f'<tr><td class="num">{rank}</td><td class="num">{score:.4g}</td>{_bar(score, scale)}'
        f'<td class="cat">{_e(pair["category"])}</td><td>{_e(pair["question"])}</td><td>{_e(pair["answer"])}</td></tr>'
        for rank, (pair, score) in enumerate(ranked, 1)
    )
    return (
        f"<h2>Query {number} <span class=\"cat\">({_e(query['category'])})</span></h2>\n"
        f'<div class="query"><b>Question:</b> {_e(query["question"])}<br><b>Answer:</b> {_e(query["answer"])}</div>\n'
        "<table><tr><th>#</th><th>score</th><th></th><th>category</th><th>question</th><th>answer</th></tr>\n"
        f"{rows}\n</table>"
    )


def render(
    queries: Sequence[Pair],
    top: Sequence[Ranked],
    *,
    title: str = "airtrace demo",
    settings: Mapping[str, object] | None = None,
) -> str:
    """The report as one HTML document.

    Args:
        queries: query pairs (``category``, ``question``, ``answer``).
        top: per query, its top training pairs with scores, best first.
        title: page title and heading.
        settings: name -> value rows shown above the results (model, layers, timings, ...).

    Returns:
        The HTML text.
    """
    if len(queries) != len(top):
        raise ValueError(f"got {len(queries)} queries but {len(top)} result lists")
    settings_rows = "\n".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in (settings or {}).items())
    sections = "\n".join(_query_section(i, q, r) for i, (q, r) in enumerate(zip(queries, top), 1))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style></head><body>\n"
        f"<h1>{_e(title)}</h1>\n"
        f'<table class="settings">\n{settings_rows}\n</table>\n{sections}\n</body></html>\n'
    )


def write_report(path: str | os.PathLike, queries: Sequence[Pair], top: Sequence[Ranked], **kwargs) -> Path:
    """Write :func:`render` to ``path`` (UTF-8; parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(queries, top, **kwargs), encoding="utf-8")
    return path
