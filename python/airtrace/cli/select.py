"""``airtrace select``: a budget of training examples chosen from a full score matrix or AirRep embeddings (random,
top-k, LESS, BIDS), written with the per-task coverage; imports ``airtrace.select``, ``airtrace.store``,
``airtrace.airrep.cli`` (the embeddings reader) and ``airtrace.cli.args``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from airtrace.cli.args import UsageError, check_output, non_negative_int, world_readable


def budget(text: str) -> int | float:
    """An argparse type: a row count (``200``) or a fraction (``0.2``, anything with a point or an exponent)."""
    try:
        return float(text) if any(c in text.lower() for c in ".e") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a row count (200) or a fraction in (0, 1] (0.2), got {text!r}") \
            from None


def read_tasks(path: str, query_ids: list | None) -> list:
    """The ``--tasks`` JSON file as one label per query column: a list in the matrix's query order, or an object
    mapping every query id the matrix records to its label.

    Raises:
        UsageError: naming ``--tasks PATH``: unreadable, not JSON, or not one label per query.
    """
    try:
        with open(path) as f:
            tasks = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--tasks {path}: {exc}") from None
    if isinstance(tasks, dict):
        if query_ids is None:
            raise UsageError(f"--tasks {path}: an object maps query ids to tasks, but the matrix records no query "
                             "ids; give a list of one label per query column instead")
        missing = [q for q in query_ids if str(q) not in tasks]
        if missing:
            raise UsageError(f"--tasks {path}: no task for {len(missing)} query ids of the matrix, e.g. "
                             f"{missing[0]!r}")
        return [tasks[str(q)] for q in query_ids]
    if not isinstance(tasks, list) or not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in tasks):
        raise UsageError(f"--tasks {path}: expected a JSON list of task labels (strings or integers), one per query "
                         "column, or an object {query_id: label}")
    return tasks


def train_ids(meta: dict, n: int, store_path: str | None) -> tuple[list, str]:
    """The matrix rows' train ids from its store (``--store``, else the one its metadata records), or the row
    indices when there is none; and where they came from.

    Raises:
        ValueError: the store holds another model's features or another number of rows than the matrix.
    """
    from airtrace.store import Store

    path = store_path or meta.get("store")
    if path is None or (store_path is None and not os.path.isdir(path)):
        return list(range(n)), "row index"
    store = Store.open(path)
    if "fingerprint" in meta:
        store.check_fingerprint(meta["fingerprint"])
    if len(store) != n:
        raise ValueError(f"{path}: the store has {len(store)} rows but the matrix {n}; it is not the store the "
                         "matrix was scored on. Fix: pass that store with --store, or score again")
    return store.ids, "store"


def embeddings(paths: list[str]):
    """(train ids, query ids, (n, q) float64 scores) from ``--airrep TRAIN_EMB QUERY_EMB``.

    Raises:
        UsageError: naming the file: missing, or not written by ``airtrace airrep embed``.
    """
    from airtrace.airrep.cli import read_embeddings
    from airtrace.select import embedding_scores

    loaded = []
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"--airrep {path}: no such file; write it with airtrace airrep embed")
        try:
            loaded.append(read_embeddings(path))
        except Exception as exc:  # safetensors raises its own error type for a file that is not safetensors
            raise UsageError(f"--airrep {path}: not an embeddings file written by airtrace airrep embed ({exc})") \
                from None
    (train_ids, train), (query_ids, queries) = loaded
    try:
        return train_ids, query_ids, embedding_scores(train, queries)
    except ValueError as exc:
        raise UsageError(f"--airrep {paths[0]} {paths[1]}: {exc}") from None


def _cmd_select(args: argparse.Namespace) -> int:
    from airtrace.select import budget_rows, matrix_header, select, task_order
    from airtrace.store import atomic_write

    check_output(args.out, "--out")
    if (args.matrix is None) == (args.airrep is None):
        raise UsageError("give the scores either as MATRIX (airtrace score --full-matrix) or as --airrep TRAIN_EMB "
                         "QUERY_EMB (airtrace airrep embed), not both or neither")
    if args.airrep is not None:
        if args.store is not None:
            raise UsageError("--store names the train ids of a MATRIX; with --airrep they come from TRAIN_EMB")
        ids, query_ids, scores = embeddings(args.airrep)
        (n, q), meta, source = scores.shape, {"metric": "airrep-dot", "query_ids": query_ids}, "embeddings"
    else:
        if not os.path.isfile(args.matrix):
            raise UsageError(f"MATRIX {args.matrix}: no such file; write it with airtrace score --full-matrix")
        n, q, meta = matrix_header(args.matrix)
        scores = args.matrix  # read block by block
    tasks = read_tasks(args.tasks, meta.get("query_ids"))
    try:
        labels = task_order(tasks, q)[0]
    except ValueError as exc:
        raise UsageError(f"--tasks {args.tasks}: {exc}") from None
    try:
        k = budget_rows(args.budget, n)
    except ValueError as exc:
        raise UsageError(f"--budget: {exc}") from None
    if args.airrep is None:
        ids, source = train_ids(meta, n, args.store)
    chosen = select(scores, tasks, args.budget, args.strategy, seed=args.seed)
    source_files = {"matrix": os.path.abspath(args.matrix)} if args.airrep is None else \
        {"airrep": [os.path.abspath(path) for path in args.airrep]}
    document = {"strategy": args.strategy, "budget": k, "n_train": n, **source_files,
                "metric": meta.get("metric"), "ids_from": source, "selected": [ids[r] for r in chosen.rows],
                "rows": chosen.rows, "tasks": [str(t) for t in labels], "coverage": chosen.coverage}
    if args.strategy == "random":
        document["seed"] = args.seed
    path = os.path.abspath(args.out)
    atomic_write(path, [json.dumps(document, indent=1).encode()])
    world_readable(path)
    if not args.quiet:
        if source == "row index":
            print("note: the matrix names no store that is present; selected ids are row indices", file=sys.stderr)
        print(f"selected {k} of {n} training examples ({args.strategy})")
        print("task\tmean_normalized\tbest")
        for task, cov in chosen.coverage.items():
            print(f"{task}\t{cov['mean_normalized']:.4f}\t{cov['best']}")
        print(f"wrote {args.out}")
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace select``."""
    from airtrace.select import STRATEGIES, STRATEGY_DEFINITIONS

    p = sub.add_parser("select", help="choose a budget of training examples from a full score matrix or AirRep "
                                      "embeddings (random, top-k, LESS, BIDS) and write their ids with the per-task "
                                      "coverage")
    p.add_argument("matrix", metavar="MATRIX", nargs="?",
                   help="the (q, n) score matrix written by airtrace score --full-matrix (or give --airrep)")
    p.add_argument("--airrep", nargs=2, metavar=("TRAIN_EMB", "QUERY_EMB"),
                   help="score by AirRep instead: the embeddings of the training examples and of the validation "
                        "queries written by airtrace airrep embed; a score is the dot product of two embeddings, the "
                        "ids come from the files")
    p.add_argument("--tasks", required=True, metavar="TASKS.json",
                   help="a JSON list of one task label per query column (the matrix's query order), or an object "
                        "{query_id: label}")
    p.add_argument("--budget", required=True, type=budget,
                   help="rows to select: a count (200) or a fraction of the training rows in (0, 1] (0.2; rounded "
                        "half up, at least 1)")
    p.add_argument("--strategy", choices=STRATEGIES, default="bids",
                   help="; ".join(f"{k}: {v}" for k, v in STRATEGY_DEFINITIONS.items()) + " (default bids)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of --strategy random (default 0)")
    p.add_argument("--store", metavar="STORE", help="the store the matrix was scored on, for the train ids "
                                                    "(default: the one the matrix records, if present)")
    p.add_argument("--out", default="selected.json", metavar="JSON",
                   help="the selection: ids in selection order, row indices, per-task coverage (default selected.json)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(run=_cmd_select, parser=p)
