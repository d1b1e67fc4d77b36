"""``airtrace demo``: SmolLM2-135M-Instruct on chatterbot Q->A pairs, attributed with LoGra + EK-FAC; imports
``airtrace.demo`` and ``airtrace.cli.args``."""

from __future__ import annotations

import argparse
import sys

from airtrace.cli.args import positive_int


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    from airtrace.demo import run

    start = time.perf_counter()
    result = run.run(args.out, n_train=None if args.full else args.train, metric=args.metric,
                     cache_dir=args.cache_dir, progress=not args.quiet, log=lambda line: print(line, file=sys.stderr),
                     threads=args.threads)
    print()
    print(run.format_top(result))
    print(f"report: {result.report.resolve()}")
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace demo``."""
    from airtrace.demo.run import DEFAULT_TRAIN

    p = sub.add_parser("demo", help="attribute held-out chatterbot questions to SmolLM2's training pairs "
                                    "(LoGra + EK-FAC), print the top-3 and write an HTML report")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--train", type=positive_int, default=DEFAULT_TRAIN,
                      help=f"training pairs (default {DEFAULT_TRAIN}, a few minutes on 2 CPU cores)")
    size.add_argument("--full", action="store_true", help="use every training pair of the corpus")
    p.add_argument("--out", default="airtrace-demo", metavar="DIR",
                   help="folder for the store, curvature and report.html (default ./airtrace-demo)")
    p.add_argument("--metric", default="relative", choices=("relative", "inner", "cosine"),
                   help="score: relative influence (default), influence (inner) or cosine")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="model cache (default $AIRTRACE_CACHE/smollm2 or ~/.cache/airtrace/smollm2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: the cores other processes leave idle, at least 1; "
                        "torch's own count when OMP_NUM_THREADS is set)")
    p.set_defaults(run=_cmd_demo, parser=p)
