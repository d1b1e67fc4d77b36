"""``airtrace score``: the most helpful / harmful training examples per query, streamed over the store (or from two
stages, an index then exact scores; or by exact influence), written as JSON, CSV or Parquet; imports
``airtrace.attribute``, ``airtrace.report``, ``airtrace.scoring``, ``airtrace.store`` and the other ``airtrace.cli``
modules."""

from __future__ import annotations

import argparse
import json
import os

from airtrace.cli.args import UsageError, bounded, check_output, positive_int, read_groups, world_readable
from airtrace.cli.fit import damping_value
from airtrace.cli.task import add_model_options, load, scaled, train_size
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


_tolerance = bounded(float, 0.0, "a relative residual in (0, 1)", 1.0)


def _solver(args: argparse.Namespace) -> dict:
    """The exact solver's settings from ``--exact``, ``--solver-tol``, ``--hessian``."""
    tol = 1e-6 if args.solver_tol is None else args.solver_tol
    return {"method": args.exact, "tol": tol, "matrix": "hessian" if args.hessian else "ggn"}


def _check_two_stage(args: argparse.Namespace) -> bool:
    """Whether --index / --airrep asks for two-stage scoring; their knobs without them, or what needs every row with
    them, is a usage error (checked before any work)."""
    if args.index is None and args.airrep is None:
        flags = [f for f, v in (("--nprobe", args.nprobe), ("--ef", args.ef), ("--candidates", args.candidates),
                                ("--no-rerank", args.no_rerank), ("--recall", args.recall)) if v]
        if flags:
            raise UsageError(f"{' '.join(flags)} apply to two-stage scoring: add --index TYPE or --airrep")
        return False
    if args.index is not None and args.airrep is not None:
        raise UsageError("--index and --airrep are two candidate sources: give one")
    if args.groups is not None or args.full_matrix is not None or args.order != "top":
        raise UsageError("--groups and --full-matrix need the exact pass over every row, as does --order bottom / "
                         "both: drop --index / --airrep")
    return True


def _two_stage(args: argparse.Namespace, store, queries) -> dict:
    """The two-stage arguments of Attributor.score from --index / --airrep and their knobs."""
    index = args.index
    if args.airrep is not None:
        index = _airrep_candidates(args, store, queries)
    return {"index": index, "nprobe": args.nprobe, "ef": args.ef, "candidates": args.candidates,
            "rerank": not args.no_rerank, "recall": True if args.recall else None}


def _airrep_candidates(args: argparse.Namespace, store, queries):
    """EmbeddingCandidates from ``--airrep TRAIN QUERIES`` (``airtrace airrep embed`` outputs), aligned by id."""
    import torch

    from airtrace.airrep.cli import read_embeddings
    from airtrace.index import EmbeddingCandidates

    aligned = []
    for path, want in zip(args.airrep, (store.ids, [i for ids, _ in queries for i in ids])):
        ids, embeddings = read_embeddings(path)
        row = {str(i): r for r, i in enumerate(ids)}
        missing = [i for i in want if str(i) not in row]
        if missing:
            raise ValueError(f"{path}: no embedding for id {missing[0]!r} (of {len(missing)}); embed every "
                             "train example and query with `airtrace airrep embed`")
        aligned.append(embeddings[torch.tensor([row[str(i)] for i in want], dtype=torch.int64)])
    return EmbeddingCandidates(*aligned)


def checked_output(args: argparse.Namespace) -> str | None:
    """The format of ``--output`` (``--format``, else its extension), with ``--output`` and ``--full-matrix``
    checked writable before any work."""
    from airtrace.report import output_format

    fmt = output_format(args.output, args.format) if args.output else args.format
    if fmt is not None and args.output is None:
        raise UsageError("--format needs --output FILE")
    check_output(args.output, "--output")
    check_output(args.full_matrix, "--full-matrix")
    return fmt


def write_scores(args: argparse.Namespace, scores, fmt: str | None, *, order: str, settings: dict, extra: dict,
                 task=None, describe_query=None) -> None:
    """Print the rows (unless ``--quiet``) and write ``--output`` (all or nothing, mode 0644) with ``extra`` keys;
    ``task`` gives texts and token strings to the document."""
    from airtrace.report import encode, scores_document
    from airtrace.store import atomic_write

    world_readable(args.full_matrix)
    if not args.quiet:
        print("query_id\torder\trank\ttrain_id\tscore")
        for row in scores.to_rows():
            print(f"{row['query_id']}\t{row['order']}\t{row['rank']}\t{row['train_id']}\t{row['score']:.6g}")
    if args.output is not None:
        document = scores_document(scores, settings=settings, order=order,
                                   describe_train=None if task is None else task.describe,
                                   describe_query=describe_query, decode=None if task is None else task.decode)
        document.update(extra)
        path = os.path.abspath(args.output)
        atomic_write(path, [encode(document, fmt)])  # all or nothing
        world_readable(path)
        if not args.quiet:
            print(f"wrote {args.output}")


def _cmd_score(args: argparse.Namespace) -> int:
    from airtrace.attribute import Attributor
    from airtrace.store import Store

    fmt = checked_output(args)
    staged = _check_two_stage(args)
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
    if args.exact is None:
        given = [flag for flag, value in (("--damping", args.damping), ("--solver-tol", args.solver_tol),
                                          ("--hessian", args.hessian or None)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to exact influence: add --exact SOLVER")
        curvature = {"curvature": "identity"}
    else:
        curvature = {"curvature": "exact", "damping": args.damping or "auto", "solver": _solver(args)}
    store = Store.open(args.store)
    attributor = Attributor.from_store(task.model, store, loss_fn=task.loss_fn, query_loss_fn=task.query_loss_fn,
                                       device=args.device, backend=args.backend, **curvature)
    if args.exact is not None:
        attributor.fit(task.train, store=store, total=train_size(task), progress=not args.quiet)
    elif args.curvature is not None:
        attributor.load_curvature(args.curvature)
    metric = args.metric or "inner"
    if args.calibration is not None:
        from airtrace.attribute.calibration import Calibration

        metric = args.metric or Calibration.load(args.calibration).metric
    topk = max(1, min(args.topk, len(store)))  # a store of n rows has at most n results per query
    scores = attributor.score(queries, store, topk=topk, metric=metric, order=args.order,
                              full_matrix_path=args.full_matrix, groups=groups,
                              token_batches=task.train if args.tokens else None, progress=not args.quiet,
                              **(_two_stage(args, store, queries) if staged else {}))
    if not args.quiet:
        if scores.stage != "exact":
            recall = "not measured (--recall measures it)" if scores.recall is None else f"{scores.recall:.4f}"
            print(f"# stage {scores.stage}, recall@{topk} {recall}")
        for report in scores.solves or []:
            print(f"solve: {report['method']} ({attributor.solver.config.matrix}), {report['columns']} queries, "
                  f"{report['iterations']} iterations, relative residual {report['residual']:.3g}")
    curvature = attributor.curvature_method if args.exact else attributor.curvature.method
    write_scores(args, scores, fmt, order=args.order, settings=_settings(args, attributor, store),
                 extra={"curvature": curvature, "solves": scores.solves, "stage": scores.stage,
                        "recall": scores.recall}, task=task, describe_query=describe_query)
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
    curvature = p.add_mutually_exclusive_group()
    curvature.add_argument("--curvature", metavar="CURV", help="factors written by fit (default: identity)")
    curvature.add_argument("--exact", metavar="SOLVER", choices=("cg", "lissa", "arnoldi", "dense"),
                           help="exact influence (H + λ)⁻¹ by SOLVER (cg: preconditioned by EK-FAC) over the "
                                "model's training batches; needs a store from `featurize --exact`")
    p.add_argument("--damping", type=damping_value, metavar="LAMBDA|auto",
                   help="with --exact: absolute λ, or 'auto' (default; EK-FAC's per-layer rule)")
    p.add_argument("--solver-tol", type=_tolerance, help="with --exact: relative residual (default 1e-6)")
    p.add_argument("--hessian", action="store_true",
                   help="with --exact: the loss's Hessian instead of the Gauss-Newton matrix")
    p.add_argument("--queries", metavar="FILE",
                   help="queries from a file instead of the factory's: JSON lines (objects, made into batches by the "
                        "task's format_queries, or strings = {\"text\": ...}) or plain text, one query per line")
    p.add_argument("--batch-size", type=positive_int, default=8, help="queries per batch with --queries (default 8)")
    add_output_options(p)
    p.add_argument("--order", default="top", choices=ORDERS,
                   help="top: the most helpful examples (highest scores) first; bottom: the most harmful (lowest, "
                        "most negative) first; both (default top)")
    p.add_argument("--tokens", action="store_true",
                   help="also score the listed training examples token by token (runs them again; factored "
                        "projection): which tokens carry the influence")
    p.add_argument("--groups", metavar="JSON", help="JSON list of lists of train row indices: group sums")
    p.add_argument("--index", metavar="TYPE|PATH",
                   help="two-stage: candidates from the index built by `airtrace index build` (flat, ivfpq, hnsw, or "
                        "the .faiss path), re-scored exactly")
    p.add_argument("--airrep", nargs=2, metavar=("TRAIN_EMB", "QUERY_EMB"),
                   help="two-stage: candidates by AirRep embedding dot products (`airtrace airrep embed` outputs "
                        "covering the store's and the queries' ids), re-scored exactly")
    p.add_argument("--nprobe", type=positive_int, help="ivfpq lists searched (default 32)")
    p.add_argument("--ef", type=positive_int, help="hnsw search candidates (default max(64, --candidates))")
    p.add_argument("--candidates", type=positive_int, help="candidates per query re-scored (default max(100, 10 topk))")
    p.add_argument("--no-rerank", action="store_true", help="keep the index's approximate scores")
    p.add_argument("--recall", action="store_true",
                   help="also run the exact pass and report recall@topk (default: only on small stores)")
    p.add_argument("--calibration", metavar="FILE",
                   help="score with the metric chosen by `airtrace calibrate` (unless --metric is given)")
    p.set_defaults(run=scaled(_cmd_score), parser=p)


def add_output_options(p: argparse.ArgumentParser) -> None:
    """``--topk``, ``--metric``, ``--full-matrix``, ``--output`` and ``--format`` (what :func:`write_scores` writes)."""
    p.add_argument("--topk", type=positive_int, default=10,
                   help="results per query and order (default 10; at most the store's rows)")
    p.add_argument("--metric", choices=METRICS, help="score (default inner; the metrics are defined above)")
    p.add_argument("--full-matrix", metavar="PATH", help="also write the (q, n) score matrix (safetensors)")
    p.add_argument("--output", metavar="FILE",
                   help="write the results (checked before any work): JSON (rows, texts, settings, distribution; "
                        "what `airtrace report` reads), CSV or Parquet (rows: query_id, order, rank, train_index, "
                        "train_id, score, metric)")
    p.add_argument("--format", choices=("json", "csv", "parquet"),
                   help="format of --output (default: from its extension, else json)")
