"""``airtrace score``: the most helpful / harmful training examples per query, streamed over the store, written as
JSON, CSV or Parquet; imports ``airtrace.attribute``, ``airtrace.report``, ``airtrace.scoring``, ``airtrace.store`` and
the other ``airtrace.cli`` modules."""

from __future__ import annotations

import argparse
import json
import os

from airtrace.cli.args import UsageError, check_output, positive_int, read_groups, world_readable
from airtrace.cli.task import add_model_options, load, scaled
from airtrace.scoring import METRIC_DEFINITIONS, METRICS, ORDERS, SIGN_CONVENTION


def read_queries(path: str) -> list[dict]:
    """The records of a ``--queries`` file: JSON lines (an object, or a string = ``{"text": ...}``), or any other
    file one text query per line (``{"text": line}``); blank lines are skipped.

    Raises:
        ValueError: unreadable file, a bad JSON line (names the line), or no queries.
    """
    jsonl = os.path.splitext(path)[1].lower() in (".jsonl", ".json", ".ndjson")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not jsonl:
                records.append({"text": line.rstrip("\n")})
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"--queries {path}: line {number} is not JSON ({exc})") from None
            if isinstance(record, str):
                record = {"text": record}
            if not isinstance(record, dict):
                raise ValueError(f"--queries {path}: line {number} must be a JSON object or string, "
                                 f"got {type(record).__name__}")
            records.append(record)
    if not records:
        raise ValueError(f"--queries {path}: no queries in the file")
    return records


def query_batches(records: list[dict], format_queries, batch_size: int) -> tuple[list, list]:
    """(ids, batch) pairs of the records, and the ids: from an "id" field when every record has one, else the
    record's position; batches made by ``format_queries`` (default: one tensor per field)."""
    from airtrace.attribute.batches import collate_records

    ids = [r["id"] for r in records] if all("id" in r for r in records) else list(range(len(records)))
    if len(set(map(str, ids))) != len(ids):
        raise ValueError("--queries: the records' \"id\" values are not unique")
    collate = format_queries or collate_records
    batches = [(ids[s: s + batch_size], collate(records[s: s + batch_size])) for s in range(0, len(records), batch_size)]
    return batches, ids


def _settings(args: argparse.Namespace, attributor, store) -> dict:
    projection = attributor.projection
    shape = (f"factored {projection['k_out']} x {projection['k_in']} per layer" if projection["type"] == "factored"
             else f"dense k = {projection['k']}")
    damping = sorted(attributor.curvature.damping.values()) if attributor.curvature.method != "identity" else []
    return {
        "model": args.model + "".join(f" {k}={v}" for k, v in args.model_arg),
        "store": f"{args.store} ({len(store)} training examples)",
        "layers": f"{len(attributor.layers)} tracked layers, {attributor.width} features per example ({shape})",
        "curvature": attributor.curvature.method + (f", damping {damping[0]:.3g} .. {damping[-1]:.3g}"
                                                    if damping else ""),
        "queries": args.queries or "the factory's queries",
        "ranking": f"top {args.topk}, order {args.order}" + (", per-token scores" if args.tokens else ""),
    }


def _cmd_score(args: argparse.Namespace) -> int:
    from airtrace.attribute import Attributor
    from airtrace.report import encode, output_format, scores_document
    from airtrace.store import Store, atomic_write

    fmt = output_format(args.output, args.format) if args.output else args.format
    if fmt is not None and args.output is None:
        raise UsageError("--format needs --output FILE")
    check_output(args.output, "--output")
    check_output(args.full_matrix, "--full-matrix")
    groups = read_groups(args.groups)
    task = load(args)
    if args.queries is not None:
        records = read_queries(args.queries)
        queries, ids = query_batches(records, task.format_queries, args.batch_size)
        describe_query = dict(zip(ids, (r.get("text", json.dumps(r)) for r in records))).get
    else:
        queries, describe_query = task.queries, task.describe
        if queries is None:
            raise UsageError(f"--model {args.model!r}: the factory returned no query batches; pass --queries FILE")
    attributor = Attributor.from_store(task.model, args.store, loss_fn=task.loss_fn, query_loss_fn=task.query_loss_fn,
                                       curvature="identity", device=args.device, backend=args.backend)
    if args.curvature is not None:
        attributor.load_curvature(args.curvature)
    topk = max(1, min(args.topk, len(Store.open(args.store))))  # a store of n rows has at most n results per query
    scores = attributor.score(queries, args.store, topk=topk, metric=args.metric, order=args.order,
                              full_matrix_path=args.full_matrix, groups=groups,
                              token_batches=task.train if args.tokens else None, progress=not args.quiet)
    world_readable(args.full_matrix)
    if not args.quiet:
        print("query_id\torder\trank\ttrain_id\tscore")
        for row in scores.to_rows():
            print(f"{row['query_id']}\t{row['order']}\t{row['rank']}\t{row['train_id']}\t{row['score']:.6g}")
    if args.output is not None:
        document = scores_document(scores, settings=_settings(args, attributor, Store.open(args.store)),
                                   order=args.order, describe_train=task.describe, describe_query=describe_query,
                                   decode=task.decode)
        document["curvature"] = attributor.curvature.method
        path = os.path.abspath(args.output)
        atomic_write(path, [encode(document, fmt)])  # all or nothing
        world_readable(path)
        if not args.quiet:
            print(f"wrote {args.output}")
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace score``."""
    metrics = "; ".join(f"{m}: {METRIC_DEFINITIONS[m]}" for m in METRICS)
    p = sub.add_parser(
        "score", help="most helpful / harmful training examples per query, streamed over STORE",
        description=f"Score queries against every training example of STORE. Sign: {SIGN_CONVENTION}. "
                    f"Metrics ({metrics}).")
    p.add_argument("store", metavar="STORE", help="store written by featurize")
    add_model_options(p)
    p.add_argument("--curvature", metavar="CURV", help="factors written by fit (default: identity)")
    p.add_argument("--queries", metavar="FILE",
                   help="queries from a file instead of the factory's: JSON lines (objects, made into batches by the "
                        "task's format_queries, or strings = {\"text\": ...}) or plain text, one query per line")
    p.add_argument("--batch-size", type=positive_int, default=8, help="queries per batch with --queries (default 8)")
    p.add_argument("--topk", type=positive_int, default=10,
                   help="results per query and order (default 10; at most the store's rows)")
    p.add_argument("--metric", default="inner", choices=METRICS,
                   help="score (default inner; the metrics are defined above)")
    p.add_argument("--order", default="top", choices=ORDERS,
                   help="top: the most helpful examples (highest scores) first; bottom: the most harmful (lowest, "
                        "most negative) first; both (default top)")
    p.add_argument("--tokens", action="store_true",
                   help="also score the listed training examples token by token (runs them again; factored "
                        "projection): which tokens carry the influence")
    p.add_argument("--full-matrix", metavar="PATH", help="also write the (q, n) score matrix (safetensors)")
    p.add_argument("--groups", metavar="JSON", help="JSON list of lists of train row indices: group sums")
    p.add_argument("--output", metavar="FILE",
                   help="write the results (checked before any work): JSON (rows, texts, settings, distribution; "
                        "what `airtrace report` reads), CSV or Parquet (rows: query_id, order, rank, train_index, "
                        "train_id, score, metric)")
    p.add_argument("--format", choices=("json", "csv", "parquet"),
                   help="format of --output (default: from its extension, else json)")
    p.set_defaults(run=scaled(_cmd_score), parser=p)
