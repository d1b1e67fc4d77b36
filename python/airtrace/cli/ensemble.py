"""``airtrace ensemble``: the scores of several independently trained models, each against its own store, averaged or
weighted; imports ``airtrace.attribute`` and the other ``airtrace.cli`` modules."""

from __future__ import annotations

import argparse
import math

from airtrace.cli.args import UsageError
from airtrace.cli.score import add_output_options, checked_output, write_scores
from airtrace.cli.task import load_named


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from airtrace.attribute import Attributor
    from airtrace.attribute.ensemble import score_ensemble

    m = len(args.stores)
    fmt = checked_output(args)
    for flag, values in (("--models", args.models), ("--curvatures", args.curvatures), ("--weights", args.weights)):
        if values is not None and len(values) != m:
            raise UsageError(f"{flag} takes one value per store ({m}), got {len(values)}")
    if args.weights is not None and not all(math.isfinite(w) for w in args.weights):
        raise UsageError(f"--weights must be finite numbers, got {args.weights}")
    members, queries = [], None
    for i, (store, factory) in enumerate(zip(args.stores, args.models)):
        task = load_named(factory)
        if task.queries is None:
            raise UsageError(f"--models {factory!r}: the factory returned no query batches to score")
        queries = task.queries if queries is None else queries
        attributor = Attributor.from_store(task.model, store, loss_fn=task.loss_fn, curvature="identity",
                                           device=args.device, backend=args.backend)
        if args.curvatures is not None:
            attributor.load_curvature(args.curvatures[i])
        members.append((attributor, store))
    scores = score_ensemble(members, queries, topk=args.topk, metric=args.metric or "inner", weights=args.weights,
                            full_matrix_path=args.full_matrix, progress=not args.quiet)
    weights = args.weights or [1 / m] * m
    write_scores(args, scores, fmt, order="top", extra={"ensemble": m, "weights": weights},
                 settings={"models": ", ".join(f"{f} ({s})" for f, s in zip(args.models, args.stores)),
                           "weights": ", ".join(f"{w:.4g}" for w in weights)})
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace ensemble``."""
    p = sub.add_parser("ensemble", help="scores of several trained models (one store each), averaged or weighted")
    p.add_argument("stores", metavar="STORE", nargs="+", help="one store per model, written by featurize")
    p.add_argument("--models", nargs="+", required=True, metavar="MODULE:FUNCTION",
                   help="one factory per store (its model's weights); the queries are the first factory's")
    p.add_argument("--curvatures", nargs="+", metavar="CURV", help="one fitted curvature per store (default identity)")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per store: the sum Σ w_m S_m (e.g. learning rates); default the mean")
    p.add_argument("--device", default="cpu", help="device for the models and the store shards (default cpu)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "cpu", "cuda", "triton"),
                   help="kernel backend (default auto)")
    add_output_options(p)  # --metric: each model's score, before combining
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(run=_cmd_ensemble, parser=p)
