"""``airtrace score``: top-k training examples per query, streamed over the store; imports ``airtrace.attribute``,
``airtrace.store`` and the other ``airtrace.cli`` modules."""

from __future__ import annotations

import argparse
import json
import os

from airtrace.cli.args import UsageError, positive_int, read_groups
from airtrace.cli.task import add_model_options, load, scaled


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
    attributor = Attributor.from_store(task.model, args.store, loss_fn=task.loss_fn, curvature="identity",
                                       device=args.device, backend=args.backend)
    if args.curvature is not None:
        attributor.load_curvature(args.curvature)
    from airtrace.store import Store

    topk = max(1, min(args.topk, len(Store.open(args.store))))  # a store of n rows has at most n results per query
    two_stage = _two_stage(args, task)
    scores = attributor.score(task.queries, args.store, topk=topk, metric=args.metric,
                              full_matrix_path=args.full_matrix, groups=read_groups(args.groups),
                              progress=not args.quiet, **two_stage)
    if scores.stage != "exact":
        recall = "not measured (--recall measures it)" if scores.recall is None else f"{scores.recall:.4f}"
        print(f"# stage {scores.stage}, recall@{topk} {recall}")
    rows = scores.to_rows()
    print("query_id\trank\ttrain_id\tscore")
    for row in rows:
        print(f"{row['query_id']}\t{row['rank']}\t{row['train_id']}\t{row['score']:.6g}")
    if args.output is not None:
        result = {"metric": scores.metric, "curvature": attributor.curvature.method, "query_ids": scores.query_ids,
                  "topk": rows, "groups": None if scores.groups is None else scores.groups.tolist(),
                  "stage": scores.stage, "recall": scores.recall}
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
    p.set_defaults(run=scaled(_cmd_score), parser=p)
