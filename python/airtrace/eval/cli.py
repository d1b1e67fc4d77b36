"""``airtrace eval``: attribution quality against really retrained models on a built-in task; imports the eval modules,
``airtrace.util`` and ``airtrace.cli.args``.

    airtrace eval digits --model mlp|logreg --method identity ekfac ... --subsets 50
                         [--loo N] [--mislabel FRACTION] [--topk K]

prints one table per experiment: LDS with its 95% bootstrap interval and the
attribution wall time, LOO Pearson / Spearman, mislabel AUC, and top-k removal
vs random removal. Retrained ground truth is cached under
``$AIRTRACE_CACHE/eval`` (default ``~/.cache/airtrace/eval``).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from airtrace.eval import cache
from airtrace.util.cache import cache_root
from airtrace.eval.experiments import METHODS


def _table(title: str, columns: list[str], rows: list[dict], formats: dict[str, str]) -> str:
    cells = [[formats.get(c, "{}").format(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cmd_digits(args: argparse.Namespace) -> int:
    import time

    import torch

    from airtrace.cli.args import UsageError
    from airtrace.eval import experiments
    from airtrace.eval.tasks.digits import DigitsTask, digits_config

    overrides = {key: value for key, value in (("n_train", args.n_train), ("n_query", args.n_query),
                                                ("steps", args.steps)) if value is not None}
    try:
        config = digits_config(args.model, **overrides)
        task = DigitsTask(config)
        methods = experiments.check_methods(args.method, task)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    kwargs = dict(projection={"type": "factored", "k_in": args.k_in, "k_out": args.k_out, "seed": 0,
                              "exact_small": args.exact_small})
    progress = not args.quiet
    f4, f1 = "{:.4f}", "{:.1f}"
    rows = experiments.run_lds(task, methods, args.subsets, args.fraction, args.seed, progress, **kwargs)
    print(_table(f"LDS, {args.subsets} models retrained on {args.fraction:g} subsets (digits {args.model}, "
                 f"n={config.n_train}, q={config.n_query})", ["method", "lds", "ci_lo", "ci_hi", "seconds"], rows,
                 {"lds": f4, "ci_lo": f4, "ci_hi": f4, "seconds": f1}))
    if args.loo:
        rows = experiments.run_loo(task, methods, args.loo, args.seed, progress, **kwargs)
        print()
        print(_table(f"leave-one-out, {min(args.loo, config.n_train)} examples removed one at a time",
                     ["method", "loo_pearson", "loo_spearman"], rows, {"loo_pearson": f4, "loo_spearman": f4}))
    if args.mislabel is not None:
        flipped = DigitsTask(replace(config, flip_fraction=args.mislabel))
        rows = experiments.run_mislabel(flipped, methods, **kwargs)
        print()
        print(_table(f"mislabel detection by self-influence, {args.mislabel:g} of the labels flipped",
                     ["method", "mislabel_auc"], rows, {"mislabel_auc": f4}))
    if args.topk:
        rows = experiments.run_topk(task, methods, args.topk, args.topk_queries, args.seed, progress, **kwargs)
        print()
        print(_table(f"top-{args.topk} removal, first {args.topk_queries} queries (change of -loss: full - retrained)",
                     ["method", "topk_change", "random_change"], rows, {"topk_change": f4, "random_change": f4}))
    print(f"\nwall time: {time.perf_counter() - start:.0f} s (retrained ground truth is cached under "
          f"{cache_root(cache.NAME)})")
    return 0


def add_parser(subparsers) -> None:
    """Register ``airtrace eval`` (with its task subcommands) on the main parser's subparsers."""
    from airtrace.cli.args import fraction, non_negative_int, positive_int

    p = subparsers.add_parser("eval", help="attribution quality against really retrained models (LDS, LOO, ...)")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    d = tasks.add_parser("digits", help="scikit-learn digits: an MLP or a logistic regression")
    d.add_argument("--model", default="mlp", choices=("mlp", "logreg"), help="classifier (default mlp)")
    d.add_argument("--method", nargs="+", default=["identity", "ekfac"], choices=sorted(METHODS), metavar="METHOD",
                   help=f"attribution methods, of {', '.join(METHODS)} (exact: logreg only; default identity ekfac)")
    d.add_argument("--subsets", type=positive_int, default=50, help="retrained subsets for LDS (default 50)")
    d.add_argument("--fraction", type=fraction, default=0.5, help="subset size / training set (default 0.5)")
    d.add_argument("--seed", type=non_negative_int, default=0, help="subset sampling seed (default 0)")
    d.add_argument("--n-train", type=positive_int, help="training images (default 1000)")
    d.add_argument("--n-query", type=positive_int, help="query images (default 100)")
    d.add_argument("--steps", type=positive_int, help="MLP Adam steps (default 300)")
    d.add_argument("--k-in", type=positive_int, default=16, help="factored projection input dim (default 16)")
    d.add_argument("--k-out", type=positive_int, default=16, help="factored projection output dim (default 16)")
    d.add_argument("--exact-small", action=argparse.BooleanOptionalAction, default=True,
                   help="keep layer sides no wider than --k-in / --k-out unprojected (default: yes)")
    d.add_argument("--loo", type=non_negative_int, default=0, metavar="N",
                   help="also leave-one-out: retrain without each of N examples (default 0: off)")
    d.add_argument("--mislabel", type=fraction, metavar="FRACTION",
                   help="also mislabel detection with this fraction of training labels flipped")
    d.add_argument("--topk", type=non_negative_int, default=0, metavar="K",
                   help="also top-K removal vs K random examples (default 0: off)")
    d.add_argument("--topk-queries", type=positive_int, default=10, help="queries for top-k removal (default 10)")
    d.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (default 1: the models are tiny, more threads mostly contend)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(run=_cmd_digits, parser=d)
