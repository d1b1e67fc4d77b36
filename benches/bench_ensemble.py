#!/usr/bin/env python
"""Ensembles of independently initialised models and of one run's checkpoints on the MLP tasks of the development
suite: what averaging buys against the one-initialisation truth and against a truth averaged over initialisations.

For each MLP task: the default setting (``Attributor`` defaults, weights and biases) on models trained on every
example from initial weights 0..4, scores averaged over the first k models (k = 1, 3, 5: TRAK's mean), and on the
checkpoints of the one run from initial weights 0 after 20, 40, 60, 80 and 100% of its full-batch Adam steps (the
learning rate is constant, so TracIn's learning-rate weights are equal: the mean again), measured on
the evaluation half of the suite's subsets (the second half, as in ``benches/bench_quality_suite.py``) against

- ``truth-init0``: the suite's ground truth (every subset model starts from initial weights 0, as the attributed
  model of k = 1 does);
- ``truth-mean3``: the mean over initialisations 0, 1 and 2 of the retrained outputs of the same subsets (the
  noise-ceiling runs of :func:`airtrace.eval.suite.ceiling`, cached): the seed-averaged datamodel that an
  ensemble estimates.

    .venv/bin/python benches/bench_ensemble.py      # -> benches/results/<device>/bench_ensemble.csv
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES))
import _common as C  # noqa: E402
from bench_quality_suite import _attributed  # noqa: E402

from airtrace.eval import metrics, suite  # noqa: E402

COLUMNS = ("task", "members", "models", "lds_truth_init0", "lds_truth_mean3", "gain_init0", "gain_mean3", "ceiling",
           "seconds")
MODELS = (1, 3, 5)
CHECKPOINTS = (0.2, 0.4, 0.6, 0.8, 1.0)
"""Checkpoints of the one run, as fractions of its steps (1.0: the attributed model)."""
TRUTH_INITS = (0, 1, 2)
QUICK_TASKS = ("wine-mlp",)


def run_task(name: str, subsets: int) -> list[dict]:
    task = suite.task(name)
    plan, _ = suite.ground_truth(task, subsets)
    outputs = torch.stack([suite.ground_truth(suite.reinitialised(task, i) if i else task, subsets)[1]
                           for i in TRUTH_INITS])  # (inits, m, q)
    half = subsets // 2
    masks, truths = plan.masks[half:], {"init0": outputs[0, half:], "mean3": outputs.mean(0)[half:]}
    ceiling = suite.ceiling(task, subsets, TRUTH_INITS[1:], subsets=subsets).mean
    members, checkpoints, start = [], [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ensemble-") as tmp:
        for init in range(max(MODELS)):
            model = suite.full_model(suite.reinitialised(task, init) if init else task)
            members.append(_attributed(model, task, tmp, f"model-{init}", damping="auto", bias=True)[0])
        per_model, start = (time.perf_counter() - start) / max(MODELS), time.perf_counter()
        for fraction in CHECKPOINTS:
            run = type(task)(replace(task.config, steps=round(task.config.steps * fraction)))
            model = run.train_fn(torch.arange(run.n_train), 0)
            checkpoints.append(_attributed(model, task, tmp, f"checkpoint-{fraction}", damping="auto", bias=True)[0])
    per_checkpoint = (time.perf_counter() - start) / len(CHECKPOINTS)
    ensembles = [(f"initial weights {'0' if k == 1 else f'0..{k - 1}'}", members[:k], per_model) for k in MODELS]
    ensembles.append((f"checkpoints at {', '.join(f'{f:.0%}' for f in CHECKPOINTS)} of the steps", checkpoints,
                      per_checkpoint))
    rows = []
    for what, chosen, seconds in ensembles:
        scores = torch.stack(chosen).mean(0)
        lds = {key: metrics.lds(scores, masks, truth, bootstrap=0).mean for key, truth in truths.items()}
        rows.append({"task": name, "members": what, "models": len(chosen), "lds_truth_init0": lds["init0"],
                     "lds_truth_mean3": lds["mean3"], "ceiling": ceiling,
                     "seconds": seconds * len(chosen)})
    for r in rows:
        r["gain_init0"] = r["lds_truth_init0"] - rows[0]["lds_truth_init0"]
        r["gain_mean3"] = r["lds_truth_mean3"] - rows[0]["lds_truth_mean3"]
        print(f"  {name:14s} {r['members']:40s}  LDS vs init-0 truth {r['lds_truth_init0']:.3f} "
              f"({r['gain_init0']:+.3f}), vs 3-init mean {r['lds_truth_mean3']:.3f} ({r['gain_mean3']:+.3f})  "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_suite_arguments(parser, QUICK_TASKS, suite.SUBSETS)
    args = parser.parse_args(argv)
    names = [t for t in C.suite_task_names(parser, args, QUICK_TASKS, list(suite.TASKS))
             if args.tasks or getattr(suite.task(t).config, "model", None) == "mlp"]
    torch.set_num_threads(1)
    head = C.header(gpu=False)
    C.print_header(head, "airtrace bench_ensemble" + (" --quick" if args.quick else ""))
    rows = [r for name in names for r in run_task(name, args.subsets)]
    C.print_table(rows, COLUMNS, title="ensembles of independently initialised models and of checkpoints "
                                       "(default setting)")
    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        print(f"wrote {C.write_csv(out / 'bench_ensemble.csv', rows, COLUMNS, head)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
