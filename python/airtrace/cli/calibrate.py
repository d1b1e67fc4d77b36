"""``airtrace calibrate``: choose projection size x curvature x damping x metric by cross-validated LDS against the
datamodel labels of retrained subsets and write the calibration file that featurize / fit / score read; imports
``airtrace.eval.calibrate`` and the other ``airtrace.cli`` modules."""

from __future__ import annotations

import argparse

from airtrace.cli.args import UsageError, positive_float, positive_int
from airtrace.cli.task import load_named


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from airtrace.eval.calibrate import CALIBRATION_FILE, calibrate

    task = load_named(args.model)
    if task.queries is None:
        raise UsageError(f"--model {args.model!r}: the factory returned no query batches (the labelled queries)")
    cal = calibrate(task.model, task.loss_fn, task.train, task.queries, None, None, args.out, labels=args.labels,
                    folds=args.folds, seed=args.seed, layers=args.layers, bias=args.bias, sizes=args.sizes,
                    curvatures=args.curvatures, factors=args.factors, auto=not args.no_auto, metrics_=args.metrics,
                    progress=not args.quiet)
    s, lds = cal.settings, cal.lds
    print(f"chosen: k {s['projection']['k_in']}, {s['curvature']}, damping {s['damping']}, metric {s['metric']}")
    print(f"held-out LDS {lds['mean']:.4f} (95% CI {lds['ci'][0]:.4f} .. {lds['ci'][1]:.4f}; {lds['folds']} folds of "
          f"{lds['subsets']} subsets, {lds['queries']} queries); in-sample {lds['in_sample']:.4f}, "
          f"{len(cal.grid)} candidates")
    print(f"wrote {args.out}/{CALIBRATION_FILE}")
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace calibrate``."""
    p = sub.add_parser("calibrate", help="choose the attribution settings by LDS against retrained-subset labels")
    p.add_argument("--model", required=True, metavar="MODULE:FUNCTION",
                   help="factory returning an airtrace.Task or (model, loss_fn, train, queries)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--labels", required=True, metavar="DIR",
                   help="ground truth of retrained subsets (airtrace.eval.retrain / `airtrace airrep label`) on the "
                        "factory's training set and queries")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for calibration.json")
    p.add_argument("--layers", nargs="+", default=["*"], metavar="PATTERN", help="tracked layer name patterns")
    p.add_argument("--bias", action="store_true", help="attribute through biases too")
    p.add_argument("--sizes", nargs="+", type=positive_int, default=[8, 16, 32], help="projection sizes k")
    p.add_argument("--curvatures", nargs="+", default=["ekfac", "kfac", "fisher"],
                   choices=("ekfac", "kfac", "fisher"), help="curvatures tried")
    p.add_argument("--factors", nargs="+", type=positive_float, default=[1e-3, 1e-2, 1e-1, 1.0, 10.0],
                   help="relative damping factors tried")
    p.add_argument("--no-auto", action="store_true", help="do not try damping 'auto'")
    p.add_argument("--metrics", nargs="+", default=["inner", "cosine", "relative"],
                   choices=("inner", "cosine", "relative"), help="metrics tried")
    p.add_argument("--folds", type=positive_int, default=4, help="cross-validation parts of the subsets (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.set_defaults(run=_cmd_calibrate, parser=p)
