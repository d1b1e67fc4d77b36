#!/usr/bin/env python
"""The default factored projection, chosen by leave-one-task-out LDS on the development suite.

Each candidate rule is a factored projection (size k, ``exact_small``, ``exact_budget``: layers whose whole gradient
has at most that many entries are kept unprojected) with the default curvature (EK-FAC) and damping (``"auto"``),
metric inner, weights and biases. Every candidate is scored on the evaluation half of each task's retrained subsets
(the second half, as in ``benches/bench_quality_suite.py``). Leave-one-task-out: for each task, the candidate with
the best mean LDS over the *other* tasks is chosen and its LDS on the task is reported next to the task's best
candidate; a rule that wins on the task it is scored on does not count.

    .venv/bin/python benches/bench_projection.py            # tabular tasks -> benches/results/<device>/bench_projection.csv
    .venv/bin/python benches/bench_projection.py --tasks digits-logreg,digits-mlp,wine-logreg,wine-mlp,diabetes-mlp,lm
    .venv/bin/python benches/bench_projection.py --quick    # wine tasks only, writes nothing
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES))
import _common as C  # noqa: E402

from airtrace.attribute import Attributor  # noqa: E402
from airtrace.eval import metrics, suite  # noqa: E402

COLUMNS = ("task", "rule", "width", "lds", "seconds", "loto_choice", "status")
RULES = {
    "k16": dict(k_in=16, k_out=16, exact_budget=0),
    "k32": dict(k_in=32, k_out=32, exact_budget=0),
    "k64": dict(k_in=64, k_out=64, exact_budget=0),
    "k16+budget1024": dict(k_in=16, k_out=16, exact_budget=1024),
    "k16+budget4096": dict(k_in=16, k_out=16, exact_budget=4096),
    "k16+budget16384": dict(k_in=16, k_out=16, exact_budget=16384),
    "k16+budget65536": dict(k_in=16, k_out=16, exact_budget=65536),
}
"""Candidate rule name -> factored projection (seed 0, ``exact_small`` True). Budgets stop at 65536 entries per
layer (256 KB per example in float32, 256 times a 16 x 16 block): beyond, the store's cost decides, not LDS."""
QUICK_TASKS = ("wine-logreg", "wine-mlp")


def score_rule(task, model, projection: dict, tmp: str) -> tuple[torch.Tensor, int]:
    """(q, n) inner-product scores (training-row order) of one projection with EK-FAC, damping auto; and the width."""
    train = task.train_batches(256)
    at = Attributor(model, loss_fn=task.loss_fn, projection={**projection, "seed": 0, "exact_small": True},
                    curvature="ekfac", damping="auto", bias=True)
    store = at.featurize(train, os.path.join(tmp, "store"), dtype="float32", progress=False)
    at.fit(train, store=store, progress=False)
    path = os.path.join(tmp, "scores.safetensors")
    result = at.score(task.query_batches(256), store, topk=1, metric="inner", full_matrix_path=path, progress=False)
    scores = load_file(path)["scores"].double()
    return scores[torch.tensor(result.query_ids).argsort()][:, torch.tensor(store.ids).argsort()], at.width


def run_task(name: str, subsets: int) -> list[dict]:
    task = suite.task(name)
    plan, outputs = suite.ground_truth(task, subsets)
    masks, truth = plan.masks[subsets // 2:], outputs[subsets // 2:]
    model = suite.full_model(task)
    rows = []
    for rule, projection in RULES.items():
        with tempfile.TemporaryDirectory(prefix="bench_projection-") as tmp:
            start = time.perf_counter()
            scores, width = score_rule(task, model, projection, tmp)
            lds = metrics.lds(scores, masks, truth, bootstrap=0).mean
        rows.append({"task": name, "rule": rule, "width": width, "lds": lds, "seconds": time.perf_counter() - start,
                     "loto_choice": "", "status": "ok"})
        print(f"  {name:14s} {rule:18s} width {width:6d}  LDS {lds:.3f}  (load {os.getloadavg()[0]:.1f})", flush=True)
    return rows


def leave_one_task_out(rows: list[dict]) -> list[dict]:
    """Per task: the rule with the best mean LDS over the other tasks, scored on the task.

    Rules tied on the other tasks (mean LDS equal to 1e-6: they give those tasks the same features) go to the larger
    budget, then the larger k: keeping more of the gradient, the direction every task that separates them favours.
    """
    tasks = sorted({r["task"] for r in rows})
    lds = {(r["task"], r["rule"]): r["lds"] for r in rows}
    out = []
    for task in tasks:
        others = [t for t in tasks if t != task]
        chosen = max(RULES, key=lambda rule: (round(sum(lds[t, rule] for t in others) / max(len(others), 1), 6),
                                              RULES[rule]["exact_budget"], RULES[rule]["k_in"]))
        best = max(RULES, key=lambda rule: lds[task, rule])
        out.append({"task": task, "rule": "loto", "width": "", "lds": lds[task, chosen], "seconds": "",
                    "loto_choice": chosen, "status": f"best on the task: {best} {lds[task, best]:.3f}"})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_suite_arguments(parser, QUICK_TASKS, suite.SUBSETS)
    args = parser.parse_args(argv)
    names = C.suite_task_names(parser, args, QUICK_TASKS, list(suite.TASKS))
    torch.set_num_threads(1)
    head = C.header(gpu=False)
    C.print_header(head, "airtrace bench_projection" + (" --quick" if args.quick else ""))
    rows = [r for name in names for r in run_task(name, args.subsets)]
    rows += leave_one_task_out(rows)
    C.print_table([r for r in rows if r["rule"] == "loto"], COLUMNS, title="leave-one-task-out choice")
    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        print(f"wrote {C.write_csv(out / 'bench_projection.csv', rows, COLUMNS, head)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
