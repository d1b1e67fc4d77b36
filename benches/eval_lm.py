"""LDS of airtrace's gradient methods on the chatterbot causal-LM task, with stage times.

Trains the small GPT of :mod:`airtrace.eval.tasks.lm` on the whole training pool,
retrains it on ``--subsets`` random 50% subsets (ground truth cached under
``$AIRTRACE_CACHE/eval/<config hash>/``, default ``~/.cache/airtrace``; a killed
run resumes), then for LoGra + identity, LoGra + EK-FAC and TRAK-style dense
projection: featurize, fit, score, and the LDS with a bootstrap 95% interval.

    .venv/bin/python benches/eval_lm.py            # full size (~10-20 min on 2 CPU cores the first time)
    .venv/bin/python benches/eval_lm.py --quick    # tiny model, 8 subsets: smoke pass, writes nothing
    .venv/bin/python benches/eval_lm.py --size large --subsets 50 --out /tmp/lm
    .venv/bin/python benches/eval_lm.py --threads 1     # steadier stage times on a busy machine

Writes ``eval_lm.csv`` (method, lds, ci_lo, ci_hi, featurize_s, fit_s, score_s) to
``benches/results/<device>/`` (or ``--out``). Bad flags exit with status 2.

Targets: none (the LDS figures are reported, not judged); ``--check`` is accepted like in every
bench.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (RESULTS, add_check_flag, device_slug, header, print_header, print_table,  # noqa: E402
                     report_targets, write_csv)

from airtrace.eval.tasks import lm_eval  # noqa: E402
from airtrace.eval.tasks.lm import SIZES, LMTask, lm_config  # noqa: E402

COLUMNS = ("method", "lds", "ci_lo", "ci_hi", "featurize_s", "fit_s", "score_s", "settings")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and 8 subsets; writes nothing unless --out")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="task size preset (default: default)")
    parser.add_argument("--subsets", type=_positive_int, default=None, help="retrained 50%% subsets (default 32)")
    parser.add_argument("--methods", default=",".join(lm_eval.METHODS),
                        help=f"comma-separated, from {','.join(lm_eval.METHODS)}")
    parser.add_argument("--out", type=Path, default=None, help="folder for eval_lm.csv")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch intra-op threads for attribution (default: torch's; training always uses 1)")
    add_check_flag(parser)
    args = parser.parse_args(argv)
    args.methods = [name for name in args.methods.split(",") if name]
    unknown = [name for name in args.methods if name not in lm_eval.METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown}; choose from {','.join(lm_eval.METHODS)}")
    args.size = args.size or ("tiny" if args.quick else "default")
    args.subsets = args.subsets or (8 if args.quick else 32)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    head = header(gpu=False)
    print_header(head, "LDS on the chatterbot causal-LM task")
    config = lm_config(args.size)
    task = LMTask(config)
    print(f"# task      {config.as_dict()}")
    print(f"# cache     {lm_eval.task_dir(task)}")
    start = time.perf_counter()
    lm_eval.ground_truth(task, args.subsets)
    lm_eval.full_model(task)
    print(f"# ground truth and full model ready in {time.perf_counter() - start:.0f} s "
          f"(load {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    results = lm_eval.evaluate(config, args.methods, m=args.subsets)
    rows = [{"method": r.method, "lds": r.lds.mean, "ci_lo": r.lds.ci[0], "ci_hi": r.lds.ci[1],
             "featurize_s": r.featurize_s, "fit_s": r.fit_s, "score_s": r.score_s,
             "settings": str(lm_eval.METHODS[r.method])} for r in results]
    print_table(rows, COLUMNS[:-1], title=f"LDS, {args.subsets} subsets of 50%, {config.n_query} queries, "
                                          f"{config.n_train} training pairs (load {head['load_avg']} at start)")
    out = args.out if args.out is not None else None if args.quick else RESULTS / device_slug(head)
    if out is not None:
        path = write_csv(out / "eval_lm.csv", rows, COLUMNS, {**head, "subsets": str(args.subsets),
                                                               "size": args.size})
        print(f"\nwrote {path}")
    return report_targets([], args.check)


if __name__ == "__main__":
    sys.exit(main())
