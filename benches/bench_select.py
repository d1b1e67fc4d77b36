"""Training-data selection (:mod:`airtrace.select`) checked by real retraining on the digits MLP, the ten classes as
tasks.

Setting (float64, CPU): :mod:`airtrace.eval.tasks.digits` with ``init_seed=None``, a pool of 1000 training images
and 400 held-out images split into a validation half (the queries the selection scores against, with their class as
the task) and a test half (where the selected subsets are judged). The scores come from one model trained on the
whole pool: EK-FAC influence (exact per-layer features, ``damping="auto"``), the (n_train, q) matrix of
:meth:`airtrace.Attributor.score`; LESS gets the cosine matrix of the same features, as in its paper.

For each strategy (random, topk, less, bids) and budget (10%, 20%, 40% of the pool) a model is trained from
scratch on the subset for each of ``--seeds`` seeds (random: a new subset per seed too), and the per-class test
cross-entropy is measured. Reported per cell: the macro average over classes and the worst class, mean over seeds
with a 95% t-interval (t(0.975, seeds-1) · sd / sqrt(seeds)); the same for training on the whole pool.

Targets: the best influence strategy (topk / less / bids) beats random at every budget on macro loss with
non-overlapping intervals; BIDS's worst class is no worse than top-k's (means); whether any subset matches
full-data training (interval overlap) is printed.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benches/bench_select.py [--seeds 3] [--check]
    .venv/bin/python benches/bench_select.py --quick      # 2 seeds, budgets 20% only; writes nothing
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

STRATEGIES = ("random", "topk", "less", "bids")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def per_class_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(10,) mean test cross-entropy of each class."""
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y, reduction="none")
    return torch.stack([loss[y == c].mean() for c in range(10)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per cell (default 3)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--quick", action="store_true", help="2 seeds, budget 20% only; writes nothing")
    parser.add_argument("--out", type=Path, help="results folder (default benches/results/<device>/)")
    C.add_check_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.seeds, args.budgets = 2, [0.2]

    from airtrace import Attributor
    from airtrace.eval.tasks.digits import DigitsTask, digits_config
    from airtrace.select import select

    head = C.header(gpu=False)
    C.print_header(head, "data selection by retraining: digits MLP, classes as tasks")
    task = DigitsTask(digits_config("mlp", init_seed=None, n_train=1000, n_query=400))
    x_val, y_val = task.x_query[:200], task.y_query[:200]
    x_test, y_test = task.x_query[200:], task.y_query[200:]
    t0 = time.perf_counter()
    full_model = task.train_fn(torch.arange(task.n_train), 0)
    train = task.train_batches(256)
    queries = [(list(range(s, min(s + 100, 200))), {"x": x_val[s:s + 100], "y": y_val[s:s + 100]})
               for s in range(0, 200, 100)]
    with tempfile.TemporaryDirectory() as tmp:
        attributor = Attributor(full_model, loss_fn=task.loss_fn, projection="exact", curvature="ekfac")
        store = attributor.featurize(train, f"{tmp}/store", dtype="float32", progress=False)
        attributor.fit(train, store=store, progress=False)
        inner = attributor.score(queries, store, topk=1, matrix=True, progress=False).matrix.T
        cosine = attributor.score(queries, store, topk=1, metric="cosine", matrix=True, progress=False).matrix.T
    tasks = [int(c) for c in y_val]
    print(f"# scores: {tuple(inner.shape)} in {time.perf_counter() - t0:.1f} s (load {head['load_avg']})", flush=True)

    def judged(rows, seed):
        model = task.train_fn(torch.as_tensor(rows), seed)
        per_class = per_class_loss(model, x_test, y_test)
        return float(per_class.mean()), float(per_class.max())

    results = []
    full = [judged(list(range(task.n_train)), 100 + s) for s in range(args.seeds)]
    row = {"strategy": "full data", "budget": 1.0}
    row["macro"], row["macro_ci"] = interval([m for m, _ in full])
    row["worst"], row["worst_ci"] = interval([w for _, w in full])
    results.append(row)
    for budget in args.budgets:
        for strategy in STRATEGIES:
            runs = []
            for s in range(args.seeds):
                chosen = select(cosine if strategy == "less" else inner, tasks, budget, strategy, seed=s).rows
                runs.append(judged(chosen, 100 + s))
            row = {"strategy": strategy, "budget": budget}
            row["macro"], row["macro_ci"] = interval([m for m, _ in runs])
            row["worst"], row["worst_ci"] = interval([w for _, w in runs])
            results.append(row)
        print(f"# budget {budget:g} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    columns = ["strategy", "budget", "macro", "macro_ci", "worst", "worst_ci"]
    C.print_table(results, columns, title=f"per-class test cross-entropy (mean over {args.seeds} seeds ± 95% "
                                          "t-interval half-width; lower is better)")
    lines = []
    full_row = results[0]
    for budget in args.budgets:
        cell = {r["strategy"]: r for r in results if r["budget"] == budget}
        best = min(("topk", "less", "bids"), key=lambda s: cell[s]["macro"])
        gap = (cell["random"]["macro"] - cell["random"]["macro_ci"]) - (cell[best]["macro"] + cell[best]["macro_ci"])
        lines.append(C.target(f"budget {budget:g}: random's interval low minus the best influence strategy's "
                              f"({best}) interval high, macro loss", gap, 0.0,
                              detail=f" (random {cell['random']['macro']:.3f}, {best} {cell[best]['macro']:.3f})"))
        lines.append(C.target(f"budget {budget:g}: top-k's worst class minus BIDS's", cell["topk"]["worst"] -
                              cell["bids"]["worst"], 0.0,
                              detail=f" (bids {cell['bids']['worst']:.3f}, topk {cell['topk']['worst']:.3f})"))
        for s in STRATEGIES:
            if cell[s]["macro"] - cell[s]["macro_ci"] <= full_row["macro"] + full_row["macro_ci"]:
                print(f"# budget {budget:g}: {s} matches full data on macro loss (intervals overlap: "
                      f"{cell[s]['macro']:.3f} vs {full_row['macro']:.3f})")
    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        path = C.write_csv(out / "bench_select.csv", results, columns, head)
        plot(results, args, out / "bench_select.png")
        print(f"\nwrote {path} and {out / 'bench_select.png'}")
    return C.report_targets(lines, args.check)


def plot(results: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    full = results[0]
    for ax, key in zip(axes, ("macro", "worst")):
        for s in STRATEGIES:
            cells = [r for r in results if r["strategy"] == s]
            ax.errorbar([r["budget"] for r in cells], [r[key] for r in cells], [r[f"{key}_ci"] for r in cells],
                        marker="o", capsize=3, label=s)
        ax.axhline(full[key], color="black", linestyle="--", label="full data")
        ax.set_xlabel("budget (fraction of the pool)")
        ax.set_ylabel(f"{key} per-class test cross-entropy")
        ax.set_xticks(args.budgets)
    axes[0].legend()
    fig.suptitle(f"digits MLP: subsets chosen by attribution, retrained ({args.seeds} seeds, 95% t-intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
