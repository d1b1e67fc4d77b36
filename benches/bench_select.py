"""Training-data selection (:mod:`airtrace.select`) checked by real retraining, on two tasks (``--task``): the digits
MLP with the ten classes as tasks, and the small GPT over chatterbot pairs with the corpus categories as tasks.

``--task digits`` (float64, CPU): :mod:`airtrace.eval.tasks.digits` with ``init_seed=None``, a pool of 1000
training images and 400 held-out images split into a validation half (the queries the selection scores against,
with their class as the task) and a test half (where the selected subsets are judged). The scores come from one
model trained on the whole pool: EK-FAC influence (exact per-layer features, ``damping="auto"``), the
(n_train, q) matrix of :meth:`airtrace.Attributor.score`; LESS gets the cosine matrix of the same features, as in
its paper.

``--task lm`` (float32, CPU): :mod:`airtrace.eval.tasks.lm`, the "default" GPT (2 blocks, width 64, 12 epochs)
with ``init_seed=None, order_seed=None`` (every seed draws its own initial weights and example order), the
default pool of 800 training pairs and 400 held-out pairs (1200 of the corpus's 1229 distinct pairs). The held-out pairs of each category are split in two halves: validation (the
queries scored against, the category as the task) and test (where subsets are judged); categories with fewer
than 4 held-out pairs are no task (their training pairs stay in the pool). Scores: LoGra features (16 x 16 per
layer, every block's linear layers and ``lm_head``, weights only) with EK-FAC curvature, the ``logra-ekfac``
setting of :mod:`airtrace.eval.tasks.lm_eval`, from the model trained on the whole pool; LESS on the cosine
matrix of the same features. Judged by the mean answer-token cross-entropy of each category's test pairs.

For each strategy (random, topk, less, bids) and budget (10%, 20%, 40% of the pool) a model is trained from
scratch on the subset (the task's own recipe: the same epochs, so fewer steps) for each of ``--seeds`` seeds
(random: a new subset per seed too), and the per-task test loss is measured. Reported per cell: the macro
average over tasks and the worst task, mean over seeds with a 95% t-interval (t(0.975, seeds-1) · sd /
sqrt(seeds)); the same for training on the whole pool.

Targets: the best influence strategy (topk / less / bids) beats random at every budget on macro loss with
non-overlapping intervals (a miss says that they overlap); BIDS's worst task is no worse than top-k's (means);
whether any subset matches full-data training (interval overlap) is printed.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benches/bench_select.py --task digits|lm [--seeds 3] [--check]
    .venv/bin/python benches/bench_select.py --task lm --quick   # 2 seeds, budget 20% only; writes nothing

Writes ``bench_select_<task>.csv`` and ``.png`` to benches/results/<device>/.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

STRATEGIES = ("random", "topk", "less", "bids")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
LM_POOL, LM_HELD_OUT, LM_MIN_HELD_OUT = 800, 400, 4


@dataclass
class Setting:
    """One task's selection problem: the score matrices, the task of each query column and the judge.

    Attributes:
        title: what is trained, for the header and the plot.
        unit: what a task is ("class", "category").
        n_train: pool size.
        tasks: q task labels, one per query column.
        inner: (n_train, q) float64 influence scores.
        cosine: (n_train, q) float64 cosine scores of the same features (LESS).
        judged: (train rows, seed) -> (macro test loss over tasks, worst task's test loss).
    """

    title: str
    unit: str
    n_train: int
    tasks: list
    inner: torch.Tensor
    cosine: torch.Tensor
    judged: Callable[[list[int], int], tuple[float, float]]


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def digits_setting(tmp: str) -> Setting:
    """The digits MLP, classes as tasks (see the module docstring)."""
    from airtrace import Attributor
    from airtrace.eval.tasks.digits import DigitsTask, digits_config

    task = DigitsTask(digits_config("mlp", init_seed=None, n_train=1000, n_query=400))
    x_val, y_val = task.x_query[:200], task.y_query[:200]
    x_test, y_test = task.x_query[200:], task.y_query[200:]
    full_model = task.train_fn(torch.arange(task.n_train), 0)
    train = task.train_batches(256)
    queries = [(list(range(s, min(s + 100, 200))), {"x": x_val[s:s + 100], "y": y_val[s:s + 100]})
               for s in range(0, 200, 100)]
    attributor = Attributor(full_model, loss_fn=task.loss_fn, projection="exact", curvature="ekfac")
    store = attributor.featurize(train, f"{tmp}/store", dtype="float32", progress=False)
    attributor.fit(train, store=store, progress=False)
    inner = attributor.score(queries, store, topk=1, matrix=True, progress=False).matrix.T
    cosine = attributor.score(queries, store, topk=1, metric="cosine", matrix=True, progress=False).matrix.T

    def judged(rows, seed):
        model = task.train_fn(torch.as_tensor(rows), seed)
        with torch.no_grad():
            loss = F.cross_entropy(model(x_test), y_test, reduction="none")
        per_class = torch.stack([loss[y_test == c].mean() for c in range(10)])
        return float(per_class.mean()), float(per_class.max())

    return Setting("digits MLP, classes as tasks", "class", task.n_train, [int(c) for c in y_val], inner, cosine,
                   judged)


def lm_setting(tmp: str) -> Setting:
    """The chatterbot GPT, categories as tasks (see the module docstring)."""
    from airtrace import Attributor
    from airtrace.eval.tasks.lm import LMTask, lm_config
    from airtrace.eval.tasks.lm_eval import LAYERS, METHODS

    task = LMTask(lm_config("default", n_train=LM_POOL, n_query=LM_HELD_OUT, init_seed=None, order_seed=None))
    held_out: dict[str, list] = defaultdict(list)
    for pair in task.queries:
        held_out[pair["category"]].append(pair)
    categories = sorted(c for c, pairs in held_out.items() if len(pairs) >= LM_MIN_HELD_OUT)
    val = [pair for c in categories for pair in held_out[c][: len(held_out[c]) // 2]]
    test = {c: held_out[c][len(held_out[c]) // 2:] for c in categories}
    print(f"# {len(categories)} categories as tasks ({len(val)} validation, {sum(map(len, test.values()))} test "
          f"pairs); no task: {sorted(set(held_out) - set(categories))}", flush=True)
    full_model = task.train_fn(torch.arange(task.n_train), 0)
    train = task.train_batches(32)
    attributor = Attributor(full_model, list(LAYERS), loss_fn=task.loss_fn, **METHODS["logra-ekfac"])
    store = attributor.featurize(train, f"{tmp}/store", dtype="float32", progress=False)
    attributor.fit(train, store=store, progress=False)
    columns = torch.tensor(store.ids)

    def matrix(metric: str) -> torch.Tensor:
        """(n_train, q) float64 in pool and validation order (batches group pairs by length)."""
        scores = attributor.score(task.batches(val, 32), store, topk=1, metric=metric, matrix=True, progress=False)
        out = torch.empty(len(val), task.n_train, dtype=torch.float64)
        out[torch.tensor(scores.query_ids)[:, None], columns[None, :]] = scores.matrix.double()
        return out.T

    def judged(rows, seed):
        model = task.train_fn(torch.as_tensor(rows), seed)
        per_category = torch.stack([task.example_losses(model, test[c]).mean() for c in categories])
        return float(per_category.mean()), float(per_category.max())

    return Setting("chatterbot GPT, categories as tasks", "category", task.n_train,
                   [pair["category"] for pair in val], matrix("inner"), matrix("cosine"), judged)


SETTINGS = {"digits": digits_setting, "lm": lm_setting}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(SETTINGS), default="digits", help="what is trained (default digits)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per cell (default 3)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--quick", action="store_true", help="2 seeds, budget 20%% only; writes nothing")
    parser.add_argument("--out", type=Path, help="results folder (default benches/results/<device>/)")
    C.add_check_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.seeds, args.budgets = 2, [0.2]

    from airtrace.select import select

    head = C.header(gpu=False)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        setting = SETTINGS[args.task](tmp)
    C.print_header(head, f"data selection by retraining: {setting.title}")
    print(f"# scores: {tuple(setting.inner.shape)} in {time.perf_counter() - t0:.1f} s (load {head['load_avg']})",
          flush=True)

    results = []
    full = [setting.judged(list(range(setting.n_train)), 100 + s) for s in range(args.seeds)]
    row = {"strategy": "full data", "budget": 1.0}
    row["macro"], row["macro_ci"] = interval([m for m, _ in full])
    row["worst"], row["worst_ci"] = interval([w for _, w in full])
    results.append(row)
    for budget in args.budgets:
        for strategy in STRATEGIES:
            runs = []
            for s in range(args.seeds):
                scores = setting.cosine if strategy == "less" else setting.inner
                runs.append(setting.judged(select(scores, setting.tasks, budget, strategy, seed=s).rows, 100 + s))
            row = {"strategy": strategy, "budget": budget}
            row["macro"], row["macro_ci"] = interval([m for m, _ in runs])
            row["worst"], row["worst_ci"] = interval([w for _, w in runs])
            results.append(row)
        print(f"# budget {budget:g} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    columns = ["strategy", "budget", "macro", "macro_ci", "worst", "worst_ci"]
    C.print_table(results, columns, title=f"per-{setting.unit} test cross-entropy (mean over {args.seeds} seeds ± "
                                          "95% t-interval half-width; lower is better)")
    print(f"# total {time.perf_counter() - t0:.0f} s (load at start {head['load_avg']}, now "
          f"{C.header(gpu=False)['load_avg']})")
    lines = []
    full_row = results[0]
    for budget in args.budgets:
        cell = {r["strategy"]: r for r in results if r["budget"] == budget}
        best = min(("topk", "less", "bids"), key=lambda s: cell[s]["macro"])
        gap = (cell["random"]["macro"] - cell["random"]["macro_ci"]) - (cell[best]["macro"] + cell[best]["macro_ci"])
        lines.append(C.target(f"budget {budget:g}: random's interval low minus the best influence strategy's "
                              f"({best}) interval high, macro loss", gap, 0.0,
                              detail=f" (random {cell['random']['macro']:.3f}, {best} {cell[best]['macro']:.3f}"
                                     f"{'; the intervals overlap' if gap < 0 else ''})"))
        lines.append(C.target(f"budget {budget:g}: top-k's worst {setting.unit} minus BIDS's", cell["topk"]["worst"] -
                              cell["bids"]["worst"], 0.0,
                              detail=f" (bids {cell['bids']['worst']:.3f}, topk {cell['topk']['worst']:.3f})"))
        for s in STRATEGIES:
            if cell[s]["macro"] - cell[s]["macro_ci"] <= full_row["macro"] + full_row["macro_ci"]:
                print(f"# budget {budget:g}: {s} matches full data on macro loss (intervals overlap: "
                      f"{cell[s]['macro']:.3f} vs {full_row['macro']:.3f})")
    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        path = C.write_csv(out / f"bench_select_{args.task}.csv", results, columns, head)
        plot(results, args, setting, out / f"bench_select_{args.task}.png")
        print(f"\nwrote {path} and {out / f'bench_select_{args.task}.png'}")
    return C.report_targets(lines, args.check)


def plot(results: list[dict], args, setting: Setting, path: Path) -> None:
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
        ax.set_ylabel(f"{key} per-{setting.unit} test cross-entropy")
        ax.set_xticks(args.budgets)
    axes[0].legend()
    fig.suptitle(f"{setting.title}: subsets chosen by attribution, retrained ({args.seeds} seeds, 95% t-intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
