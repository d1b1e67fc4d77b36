"""``airtrace score``: top-k training examples per query, streamed over the store; imports ``airtrace.attribute``,
``airtrace.store`` and the other ``airtrace.cli`` modules."""

from __future__ import annotations

import argparse
import json
import os

from airtrace.cli.args import UsageError, positive_int, read_groups
from airtrace.cli.task import add_model_options, load, scaled


def _cmd_score(args: argparse.Namespace) -> int:
    from airtrace.attribute import Attributor

    task = load(args)
    if task.queries is None:
        raise UsageError(f"--model {args.model!r}: the factory returned no query batches to score")
    attributor = Attributor.from_store(task.model, args.store, loss_fn=task.loss_fn, curvature="identity",
                                       device=args.device, backend=args.backend)
    if args.curvature is not None:
        attributor.load_curvature(args.curvature)
    from airtrace.store import Store

    topk = max(1, min(args.topk, len(Store.open(args.store))))  # a store of n rows has at most n results per query
    scores = attributor.score(task.queries, args.store, topk=topk, metric=args.metric,
                              full_matrix_path=args.full_matrix, groups=read_groups(args.groups),
                              progress=not args.quiet)
    rows = scores.to_rows()
    print("query_id\trank\ttrain_id\tscore")
    for row in rows:
        print(f"{row['query_id']}\t{row['rank']}\t{row['train_id']}\t{row['score']:.6g}")
    if args.output is not None:
        result = {"metric": scores.metric, "curvature": attributor.curvature.method, "query_ids": scores.query_ids,
                  "topk": rows, "groups": None if scores.groups is None else scores.groups.tolist()}
        from airtrace.store import atomic_write

        atomic_write(os.path.abspath(args.output), [json.dumps(result, indent=1).encode()])  # all or nothing
        print(f"wrote {args.output}")
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace score``."""
    p = sub.add_parser("score", help="top-k training examples per query, streamed over STORE")
    p.add_argument("store", metavar="STORE", help="store written by featurize")
    add_model_options(p)
    p.add_argument("--curvature", metavar="CURV", help="factors written by fit (default: identity)")
    p.add_argument("--topk", type=positive_int, default=10,
                   help="results per query (default 10; at most the store's rows)")
    p.add_argument("--metric", default="inner", choices=("inner", "cosine", "relative"),
                   help="score (default inner)")
    p.add_argument("--full-matrix", metavar="PATH", help="also write the (q, n) score matrix (safetensors)")
    p.add_argument("--groups", metavar="JSON", help="JSON list of lists of train row indices: group sums")
    p.add_argument("--output", metavar="JSON", help="write the results as JSON")
    p.set_defaults(run=scaled(_cmd_score), parser=p)
