"""The HTML report of a scores document (``render``, ``write_report``): one self-contained page, inline CSS, a small
script for the search box, plots as embedded PNG; imports ``airtrace.report.document`` and ``.plot``.

Per query: its id and text, a plot of its score distribution (a sample of the training
set, with the listed rows marked), then the most helpful and the most harmful training
examples (rank, score, a bar proportional to ``|score| / max |score|`` of the query, id,
label, text). Text keeps its line breaks (code answers stay code). Rows with per-token
scores show the example's tokens shaded by their part of the score (blue helps, red
harms; the tooltip gives the value). All text is escaped. The search box filters
queries and rows by id or text as one types; ``report.html#search=WORD`` opens it filtered.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airtrace.report.document import rows_by_query, texts
from airtrace.report.plot import distribution_png

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 75em; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin: 0 0 .4em; } h3 { font-size: 1em; margin: 1em 0 .3em; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.bar { width: 7em; background: #eee; } .bar div { height: 0.9em; background: #3a7bd5; }
.bar div.neg { background: #d5533a; }
section.query { margin-top: 2.2em; }
.qtext { background: #f6f8fa; padding: 0.6em 1em; border-left: 4px solid #3a7bd5; }
.text, .qtext { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12.5px; }
.settings td:first-child { font-weight: 600; white-space: nowrap; }
.label { color: #666; white-space: nowrap; } .id { font-family: ui-monospace, monospace; white-space: nowrap; }
.tok { border-radius: 2px; } .rest { color: #666; font-size: 11px; }
#search { width: 100%; font-size: 1.05em; padding: .4em; margin: 1em 0; box-sizing: border-box; }
.note { color: #555; }
img.dist { float: right; margin: 0 0 .5em 1em; }
"""

_SCRIPT = """
const box = document.getElementById("search");
function apply() {
  const words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
  const hit = (el) => words.every((w) => el.textContent.toLowerCase().includes(w));
  let shown = 0;
  for (const section of document.querySelectorAll("section.query")) {
    const own = hit(section.querySelector(".qhead"));
    let any = false;
    for (const row of section.querySelectorAll("tr.row")) {
      const keep = !words.length || own || hit(row);
      row.hidden = !keep;
      any = any || keep;
    }
    section.hidden = !(own || any);
    if (!section.hidden) shown++;
  }
  document.getElementById("shown").textContent = shown;
}
box.addEventListener("input", apply);
if (location.hash.startsWith("#search=")) box.value = decodeURIComponent(location.hash.slice(8));
apply();
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _bar(score: float, scale: float) -> str:
    width = 100.0 * abs(score) / scale if scale > 0 else 0.0
    cls = ' class="neg"' if score < 0 else ""
    return f'<td class="bar"><div{cls} style="width:{width:.1f}%"></div></td>'


def _tokens(row: Mapping) -> str:
    """The example's tokens shaded by their part of the score (blue > 0, red < 0)."""
    scores = row["tokens"]
    strings = row.get("token_strings") or [f"⟨{t}⟩" for t in row.get("input_ids") or range(len(scores))]
    scale = max((abs(s) for s in scores), default=0.0) or 1.0
    spans = []
    for text, s in zip(strings, scores):
        alpha = min(1.0, abs(s) / scale)
        color = f"rgba(58,123,213,{alpha:.2f})" if s >= 0 else f"rgba(213,83,58,{alpha:.2f})"
        spans.append(f'<span class="tok" style="background:{color}" title="{s:.4g}">{_e(text)}</span>')
    rest = row.get("token_rest")
    tail = f'<div class="rest">layers without a token axis: {rest:.4g}</div>' if rest else ""
    return f'<div class="text">{"".join(spans)}</div>{tail}'


def _table(title: str, rows: list[dict], train: Mapping[Any, Mapping], scale: float) -> str:
    if not rows:
        return ""
    body = []
    for row in rows:
        entry = train.get(row["train_id"], {})
        text = _tokens(row) if row.get("tokens") else f'<div class="text">{_e(entry.get("text", ""))}</div>'
        body.append(
            f'<tr class="row" data-train-id="{_e(row["train_id"])}" data-order="{_e(row["order"])}" '
            f'data-score="{row["score"]!r}"><td class="num">{row["rank"]}</td><td class="num">{row["score"]:.4g}</td>'
            f'{_bar(row["score"], scale)}<td class="id">{_e(row["train_id"])}</td>'
            f'<td class="label">{_e(entry.get("label", ""))}</td><td>{text}</td></tr>')
    return (f"<h3>{_e(title)}</h3>\n<table><tr><th>#</th><th>score</th><th></th><th>train id</th><th>label</th>"
            f"<th>example</th></tr>\n" + "\n".join(body) + "\n</table>")


def _section(number: int, query: Mapping, orders: Mapping[str, list[dict]], train: Mapping, plot: str | None) -> str:
    listed = orders["top"] + orders["bottom"]
    scale = max((abs(r["score"]) for r in listed), default=0.0)
    label = f' <span class="label">({_e(query["label"])})</span>' if query.get("label") else ""
    image = f'<img class="dist" alt="score distribution" src="data:image/png;base64,{plot}">' if plot else ""
    text = f'<div class="qtext">{_e(query["text"])}</div>' if query.get("text") else ""
    return (f'<section class="query" data-query-id="{_e(query["id"])}">{image}\n'
            f'<div class="qhead"><h2>Query {number}: <span class="id">{_e(query["id"])}</span>{label}</h2>{text}</div>\n'
            f'{_table("Most helpful", orders["top"], train, scale)}\n'
            f'{_table("Most harmful", orders["bottom"], train, scale)}\n</section>')


def render(document: Mapping, *, title: str = "airtrace report", max_plots: int = 200) -> str:
    """The report of a scores document (:mod:`airtrace.report.document`) as one HTML page.

    Args:
        document: the scores document.
        title: page title and heading.
        max_plots: queries that get a distribution plot (the first ones; plots are ~5 kB each).
    """
    by_query = rows_by_query(document)
    queries, train = texts(document["queries"]), texts(document["train"])
    distribution = document.get("distribution") or None
    sections = []
    for number, query_id in enumerate(document["query_ids"], 1):
        orders = by_query[query_id]
        plot = None
        if distribution is not None and number <= max_plots:
            marked = [r["score"] for r in orders["top"] + orders["bottom"]]
            plot = distribution_png(distribution["scores"][number - 1], marked)
        sections.append(_section(number, queries.get(query_id, {"id": query_id}), orders, train, plot))
    settings = dict(document.get("settings") or {})
    settings.setdefault("metric", f"{document['metric']}: {document.get('metric_definition', '')}")
    settings.setdefault("sign", document.get("sign", ""))
    settings_rows = "\n".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in settings.items())
    n = len(document["query_ids"])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style></head><body>\n<h1>{_e(title)}</h1>\n"
        f'<table class="settings">\n{settings_rows}\n</table>\n'
        '<input id="search" type="search" placeholder="search queries and training examples by id or text">\n'
        f'<p class="note"><span id="shown">{n}</span> of {n} queries shown.</p>\n'
        + "\n".join(sections)
        + f"\n<script>{_SCRIPT}</script>\n"
        + f'<script type="application/json" id="airtrace-scores">{_json_for_script(document)}</script>\n'
        + "</body></html>\n"
    )


def _json_for_script(document: Mapping) -> str:
    """The rows as JSON safe inside a script element (for tools reading the page)."""
    rows = [{k: r[k] for k in ("query_id", "order", "rank", "train_id", "score")} for r in document["topk"]]
    return json.dumps(rows).replace("</", "<\\/")


def write_report(path: str | os.PathLike, document: Mapping, **kwargs: Any) -> Path:
    """Write :func:`render` to ``path`` (UTF-8, mode 0644; parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(document, **kwargs), encoding="utf-8")
    os.chmod(path, 0o644)
    return path
