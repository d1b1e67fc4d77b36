"""The scores document: what ``airtrace score`` writes (JSON, or its rows as CSV / Parquet) and ``airtrace report``
reads; imports ``airtrace.scoring``.

A document is a dict (JSON)::

    {"format": "airtrace.scores/1",
     "metric": "relative", "metric_definition": "...", "sign": "score > 0: ...", "order": "both",
     "settings": {"name": "value", ...},                 # how the scores were made
     "query_ids": [...],
     "queries": [{"id": ..., "text": "...", "label": "..."}, ...],   # text / label when known
     "train": [{"id": ..., "text": "...", "label": "..."}, ...],     # the listed training examples
     "topk": [{"query_id", "order", "rank", "train_index", "train_id", "score", "metric",
               "tokens", "token_rest", "token_strings"}, ...],        # tokens: per-token scores when computed
     "groups": [[...], ...] or null,                     # (q, G) group sums
     "distribution": {"train_rows": [...], "scores": [[...], ...]}}  # a sample of each query's scores

The rows (``topk``) are pandas-friendly: ``pandas.DataFrame(document["topk"])``; the
CSV and Parquet outputs hold these rows only (list columns as JSON text in CSV).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from airtrace.scoring import METRIC_DEFINITIONS, SIGN_CONVENTION, Scores

FORMAT = "airtrace.scores/1"
FORMATS = ("json", "csv", "parquet")
ROW_COLUMNS = ("query_id", "order", "rank", "train_index", "train_id", "score", "metric")
"""Columns every row has, in this order (per-token rows add tokens, token_rest, token_strings, input_ids)."""

Describe = Callable[[Any], "str | Mapping[str, Any] | None"]
"""example id -> its text, or {"text": ..., "label": ...}, or None."""


def _entry(example_id: Any, describe: Describe | None) -> dict:
    entry: dict[str, Any] = {"id": example_id}
    info = describe(example_id) if describe is not None else None
    if isinstance(info, str):
        entry["text"] = info
    elif isinstance(info, Mapping):
        entry.update({k: v for k, v in info.items() if k in ("text", "label")})
    return entry


def scores_document(scores: Scores, *, settings: Mapping[str, Any], order: str = "top",
                    describe_train: Describe | None = None, describe_query: Describe | None = None,
                    decode: Callable[[list[int]], list[str]] | None = None) -> dict:
    """The document of a :class:`airtrace.Scores` (see the module docstring).

    Args:
        scores: the scores.
        settings: name -> value rows describing the run (shown by the report).
        order: the order that was asked ("top", "bottom" or "both").
        describe_train: training example id -> text or {"text", "label"} (None: ids only).
        describe_query: the same for query ids.
        decode: token ids -> token strings, for the per-token rows.
    """
    rows = scores.to_rows()
    for row in rows:
        if decode is not None and "input_ids" in row:
            row["token_strings"] = list(decode(row["input_ids"]))
    listed = list(dict.fromkeys(row["train_id"] for row in rows))
    distribution = None
    if scores.sample is not None:
        distribution = {"train_rows": scores.sample_rows.tolist(),
                        "scores": [[float(f"{v:.6g}") for v in row] for row in scores.sample.tolist()]}
    return {
        "format": FORMAT,
        "metric": scores.metric,
        "metric_definition": METRIC_DEFINITIONS[scores.metric],
        "sign": SIGN_CONVENTION,
        "order": order,
        "settings": {str(k): str(v) for k, v in settings.items()},
        "query_ids": list(scores.query_ids),
        "queries": [_entry(q, describe_query) for q in scores.query_ids],
        "train": [_entry(t, describe_train) for t in listed],
        "topk": rows,
        "groups": None if scores.groups is None else scores.groups.tolist(),
        "distribution": distribution,
    }


def output_format(path: str, fmt: str | None) -> str:
    """``fmt``, else the format named by the file's extension (.json, .csv, .parquet), else "json"."""
    if fmt is not None:
        return fmt
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return ext if ext in FORMATS else "json"


def encode(document: Mapping, fmt: str) -> bytes:
    """The document as the bytes of a ``fmt`` file: JSON (all of it), CSV or Parquet (its rows).

    Raises:
        ValueError: unknown format; ModuleNotFoundError: Parquet without pandas and pyarrow.
    """
    if fmt == "json":
        return json.dumps(document, indent=1).encode()
    rows = list(document["topk"])
    columns = list(ROW_COLUMNS) + sorted({k for row in rows for k in row} - set(ROW_COLUMNS))
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
        return out.getvalue().encode()
    if fmt == "parquet":
        try:
            import pandas as pd
        except ModuleNotFoundError:
            raise ModuleNotFoundError("--format parquet needs pandas and pyarrow: pip install pandas pyarrow") from None
        buffer = io.BytesIO()
        pd.DataFrame(rows, columns=columns).to_parquet(buffer, index=False)
        return buffer.getvalue()
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def load_document(path: str | os.PathLike) -> dict:
    """A scores document from a file ``airtrace score --output`` wrote: JSON (whole), CSV or Parquet (rows only:
    no texts, settings or distribution).

    Raises:
        ValueError: the file is not a scores document (names the file).
    """
    path = os.fspath(path)
    fmt = output_format(path, None)
    try:
        if fmt == "json":
            with open(path, encoding="utf-8") as f:
                document = json.load(f)
            if not isinstance(document, dict) or not isinstance(document.get("topk"), list):
                raise ValueError("no 'topk' list of rows")
            return document
        rows = _csv_rows(path) if fmt == "csv" else _parquet_rows(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a scores file written by `airtrace score --output` ({exc})") from None
    missing = [c for c in ROW_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: not a scores file written by `airtrace score --output` (no column {missing[0]!r})")
    query_ids = list(dict.fromkeys(row["query_id"] for row in rows))
    metric = rows[0]["metric"] if rows else "inner"
    return {"format": FORMAT, "metric": metric, "metric_definition": METRIC_DEFINITIONS.get(metric, ""),
            "sign": SIGN_CONVENTION, "order": "/".join(dict.fromkeys(r["order"] for r in rows)),
            "settings": {"scores": os.path.basename(path)}, "query_ids": query_ids,
            "queries": [{"id": q} for q in query_ids], "train": [], "topk": rows, "groups": None,
            "distribution": None}


def _csv_rows(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("rank", "train_index"):
            row[key] = int(row[key])
        row["score"] = float(row["score"])
        for key, value in list(row.items()):
            if key in ("tokens", "token_strings", "input_ids", "token_rest") and value not in ("", None):
                row[key] = json.loads(value)
            elif value == "":
                del row[key]
    return rows


def _parquet_rows(path: str) -> list[dict]:
    import pandas as pd

    rows = pd.read_parquet(path).to_dict(orient="records")
    return [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()} for row in rows]


def rows_by_query(document: Mapping) -> dict[Any, dict[str, list[dict]]]:
    """query id -> {"top": rows by rank, "bottom": rows by rank}."""
    out: dict[Any, dict[str, list[dict]]] = {q: {"top": [], "bottom": []} for q in document["query_ids"]}
    for row in document["topk"]:
        out.setdefault(row["query_id"], {"top": [], "bottom": []})[row["order"]].append(row)
    for orders in out.values():
        for rows in orders.values():
            rows.sort(key=lambda r: r["rank"])
    return out


def texts(entries: Sequence[Mapping]) -> dict[Any, Mapping]:
    """id -> entry of the document's ``queries`` or ``train`` list."""
    return {entry["id"]: entry for entry in entries}
