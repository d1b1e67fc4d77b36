"""``airtrace score``: top-k training examples per query, streamed over the store; imports ``airtrace.attribute``,
``airtrace.store`` and the other ``airtrace.cli`` modules."""

from __future__ import annotations

import argparse
import json
import os

from airtrace.cli.args import UsageError, bounded, positive_int, read_groups
from airtrace.cli.fit import damping_value
from airtrace.cli.task import add_model_options, load, scaled, train_size


_tolerance = bounded(float, 0.0, "a relative residual in (0, 1)", 1.0)


def _solver(args: argparse.Namespace) -> dict:
    """The exact solver's settings from ``--exact``, ``--solver-tol``, ``--hessian``."""
    tol = 1e-6 if args.solver_tol is None else args.solver_tol
    return {"method": args.exact, "tol": tol, "matrix": "hessian" if args.hessian else "ggn"}


def _two_stage(args: argparse.Namespace, task) -> dict:
    """The two-stage arguments of Attributor.score from --index / --airrep and their knobs."""
    if args.index is None and args.airrep is None:
        flags = [f for f, v in (("--nprobe", args.nprobe), ("--ef", args.ef), ("--candidates", args.candidates),
                                ("--no-rerank", args.no_rerank), ("--recall", args.recall)) if v]
        if flags:
            raise UsageError(f"{' '.join(flags)} apply to two-stage scoring: add --index TYPE or --airrep")
        return {}
    if args.index is not None and args.airrep is not None:
        raise UsageError("--index and --airrep are two candidate sources: give one")
    if args.groups is not None or args.full_matrix is not None:
        raise UsageError("--groups and --full-matrix need the exact pass over every row: drop --index / --airrep")
    index = args.index
    if args.airrep is not None:
        index = _airrep_candidates(args, task)
    return {"index": index, "nprobe": args.nprobe, "ef": args.ef, "candidates": args.candidates,
            "rerank": not args.no_rerank, "recall": True if args.recall else None}


def _airrep_candidates(args: argparse.Namespace, task):
    """EmbeddingCandidates from ``--airrep TRAIN QUERIES`` (``airtrace airrep embed`` outputs), aligned by id."""
    import torch

    from airtrace.airrep.cli import read_embeddings
    from airtrace.index import EmbeddingCandidates
    from airtrace.store import Store

    aligned = []
    for path, want in zip(args.airrep, (Store.open(args.store).ids, [i for ids, _ in task.queries for i in ids])):
        ids, embeddings = read_embeddings(path)
        row = {str(i): r for r, i in enumerate(ids)}
        missing = [i for i in want if str(i) not in row]
        if missing:
            raise ValueError(f"{path}: no embedding for id {missing[0]!r} (of {len(missing)}); embed every "
                             "train example and query with `airtrace airrep embed`")
        aligned.append(embeddings[torch.tensor([row[str(i)] for i in want], dtype=torch.int64)])
    return EmbeddingCandidates(*aligned)


def _cmd_score(args: argparse.Namespace) -> int:
    from airtrace.attribute import Attributor

    task = load(args)
    if task.queries is None:
        raise UsageError(f"--model {args.model!r}: the factory returned no query batches to score")
    if args.exact is None:
        given = [flag for flag, value in (("--damping", args.damping), ("--solver-tol", args.solver_tol),
                                          ("--hessian", args.hessian or None)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to exact influence: add --exact SOLVER")
        attributor = Attributor.from_store(task.model, args.store, loss_fn=task.loss_fn, curvature="identity",
                                           device=args.device, backend=args.backend)
        if args.curvature is not None:
            attributor.load_curvature(args.curvature)
    else:
        attributor = Attributor.from_store(task.model, args.store, loss_fn=task.loss_fn, curvature="exact",
                                           damping=args.damping or "auto", solver=_solver(args), device=args.device,
                                           backend=args.backend)
        attributor.fit(task.train, store=args.store, total=train_size(task), progress=not args.quiet)
    metric = args.metric or "inner"
    if args.calibration is not None:
        from airtrace.attribute.calibration import Calibration

        metric = args.metric or Calibration.load(args.calibration).metric
    from airtrace.store import Store

    topk = max(1, min(args.topk, len(Store.open(args.store))))  # a store of n rows has at most n results per query
    two_stage = _two_stage(args, task)
    scores = attributor.score(task.queries, args.store, topk=topk, metric=metric,
                              full_matrix_path=args.full_matrix, groups=read_groups(args.groups),
                              progress=not args.quiet, **two_stage)
    if scores.stage != "exact":
        recall = "not measured (--recall measures it)" if scores.recall is None else f"{scores.recall:.4f}"
        print(f"# stage {scores.stage}, recall@{topk} {recall}")
    for report in scores.solves or []:
        print(f"solve: {report['method']} ({attributor.solver.config.matrix}), {report['columns']} queries, "
              f"{report['iterations']} iterations, relative residual {report['residual']:.3g}")
    curvature = attributor.curvature_method if args.exact else attributor.curvature.method
    report_scores(scores, args.output, {"curvature": curvature, "solves": scores.solves, "stage": scores.stage,
                                        "recall": scores.recall})
    return 0


def report_scores(scores, output: str | None, extra: dict) -> None:
    """Print the top-k rows as a table and, with ``output``, write them (and ``extra``) as JSON, all or nothing."""
    rows = scores.to_rows()
    print("query_id\trank\ttrain_id\tscore")
    for row in rows:
        print(f"{row['query_id']}\t{row['rank']}\t{row['train_id']}\t{row['score']:.6g}")
    if output is not None:
        result = {"metric": scores.metric, **extra, "query_ids": scores.query_ids, "topk": rows,
                  "groups": None if scores.groups is None else scores.groups.tolist()}
        from airtrace.store import atomic_write

        atomic_write(os.path.abspath(output), [json.dumps(result, indent=1).encode()])
        print(f"wrote {output}")


def add_parser(sub) -> None:
    """Register ``airtrace score``."""
    p = sub.add_parser("score", help="top-k training examples per query, streamed over STORE")
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
    add_output_options(p)
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
    p.add_argument("--groups", metavar="JSON", help="JSON list of lists of train row indices: group sums")
    p.set_defaults(run=scaled(_cmd_score), parser=p)


def add_output_options(p: argparse.ArgumentParser) -> None:
    """``--topk``, ``--metric``, ``--full-matrix`` and ``--output`` (what :func:`report_scores` writes)."""
    p.add_argument("--topk", type=positive_int, default=10,
                   help="results per query (default 10; at most the store's rows)")
    p.add_argument("--metric", choices=("inner", "cosine", "relative"), help="score (default inner)")
    p.add_argument("--full-matrix", metavar="PATH", help="also write the (q, n) score matrix (safetensors)")
    p.add_argument("--output", metavar="JSON", help="write the results as JSON")
