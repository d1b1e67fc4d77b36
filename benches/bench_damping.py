#!/usr/bin/env python
"""Damping rules on the development suite: LDS of the old and new default, ``"auto"`` and the oracle, and the
leave-one-task-out comparison the rules were chosen by.

Tasks: :data:`airtrace.eval.suite.TASKS` (digits and wine L2 logistic regression and MLP, diabetes MLP
with squared error, the small GPT on chatterbot), each with the ground truth of ``--subsets`` 50%
subsets retrained for real (:func:`airtrace.eval.suite.ground_truth`, cached) and its noise ceiling
(:func:`airtrace.eval.suite.ceiling`: the same subsets retrained from other initial weights). Every
task is attributed with the model trained on all its training examples, every layer (the GPT: its
blocks and head) with biases, under two projections -- ``logra`` (LoGra 16 x 16, the default) and
``exact`` (``exact_small`` with k wider than every layer: the unprojected gradients) -- and three
curvatures (fisher, kfac, ekfac); the GPT's exact Fisher is not run (its head alone is a
103424² matrix).

Per unit (task x projection x curvature) one featurize and one fit give the features in the
curvature's eigenbasis (:mod:`airtrace.eval.sweep`), so every damping is scored on the same
features. Rows (``inner`` scores, LDS with a 95% bootstrap CI over queries):

- ``old-default``: λ = 0.1 × mean eigenvalue per layer (airtrace's and kronfluence's heuristic so far);
- ``default``: ``Attributor(damping=None)``, the per-method factor of :data:`airtrace.curvature.damping.DEFAULT_FACTORS`;
- ``auto``: ``Attributor(damping="auto")`` (:func:`airtrace.curvature.damping.auto_factors`);
- ``oracle``: the best of a grid of relative factors (one for all layers, 10^-8 .. 10^2) and of
  absolute λ on the evaluation subsets themselves -- marked as such, not a method.

Leave-one-task-out (``bench_damping_loto.csv``): each candidate rule's free constants are chosen on the
other five tasks (least mean regret to the oracle over their units, one constant per curvature method)
and scored on the held-out task: ``factor`` (λ = c × mean eigenvalue), ``mean-gradient`` (the auto rule,
κ per method, b = ½ fixed), and the parameter-free ``gcv`` (generalized cross-validation of the
ones-regression on the influence hat matrix, one factor for all layers) and ``oas`` (Oracle
Approximating Shrinkage per layer). ``bench_damping_grid.csv`` keeps every unit's LDS at every grid
point. The constants fitted on all six tasks are printed; ``--check`` fails when they differ from the
shipped ones, or when ``default`` or ``auto`` is more than 0.03 LDS below the oracle on some unit.

    .venv/bin/python benches/bench_damping.py --quick   # tabular tasks, 20 subsets, writes nothing
    .venv/bin/python benches/bench_damping.py --check   # -> benches/results/<device>/bench_damping{,_loto,_grid}.csv
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES))
import _common as C  # noqa: E402

from airtrace.curvature import damping as rules  # noqa: E402
from airtrace.attribute import Attributor  # noqa: E402
from airtrace.curvature import Damping  # noqa: E402
from airtrace.eval import metrics, suite  # noqa: E402
from airtrace.eval.sweep import spectral  # noqa: E402

PROJECTIONS = {"logra": dict(k_in=16, k_out=16, seed=0),
               "exact": dict(k_in=4096, k_out=4096, seed=0, exact_small=True)}
CURVATURES = ("fisher", "kfac", "ekfac")
SKIP = {("lm", "exact", "fisher"): "not run: the unprojected Fisher of the head is a 103424 x 103424 matrix"}
OLD_FACTOR = 0.1
FACTORS = [10 ** (k / 3) for k in range(-24, 7)]  # 1e-8 .. 1e2
KAPPAS = [10 ** (k / 3) for k in range(-6, 22)]  # 1e-2 .. 1e7
TARGET = 0.03
CEILING = {"lm": (50, (1,))}
"""(subsets, initialisations) retrained from other initial weights for the ceiling (default: all of the truth's
subsets from initialisations 1 and 2)."""
COLUMNS = ("task", "projection", "curvature", "rule", "lds", "lds_ci_lo", "lds_ci_hi", "regret", "factor",
           "ceiling", "status")
LOTO_COLUMNS = ("task", "projection", "curvature", "candidate", "constants", "lds", "oracle", "regret")
GRID_COLUMNS = ("task", "projection", "curvature", "family", "constant", "lds")


# --------------------------------------------------------------------------- one unit


def features(attributor: Attributor, batches) -> dict[str, torch.Tensor]:
    """{layer: (rows, k_out, k_in)} features of the batches, rows in id order."""
    ids, rows = [], []
    for batch_ids, batch in batches:
        rows.append(attributor.features(batch))
        ids.extend(batch_ids)
    return attributor.featurizer.split(torch.cat(rows)[torch.tensor(ids).argsort()])


def unit(task, model, projection: str, curvature: str):
    """(Spectral at the fitted eigenbasis, {rule: {layer: λ}}, auto criterion {layer: ρ}) of one unit."""
    lm = suite.is_lm(task)
    layers = ["blocks.*", "lm_head"] if lm else "*"
    batch = 32 if lm else 256
    train, queries = task.train_batches(batch), task.query_batches(batch)
    settings = dict(loss_fn=task.loss_fn, bias=True, projection=PROJECTIONS[projection], curvature=curvature)
    attributor = Attributor(model, layers, **settings)
    with tempfile.TemporaryDirectory(prefix="bench_damping-") as tmp:
        store = attributor.featurize(train, os.path.join(tmp, "store"), dtype="float32", progress=False)
        default = attributor.fit(train, store=store, progress=False)
        auto = Attributor(model, layers, damping="auto", **settings).fit(train, store=store, progress=False)
        chunks = list(store.iter_shards())
        order = torch.tensor(store.ids).argsort()
        x = attributor.featurizer.split(torch.cat([c.features for c in chunks])[order])
    sp = spectral(default, x, features(attributor, queries))
    old = {name: OLD_FACTOR * float(e.mean()) for name, e in sp.eigenvalues.items()}
    return sp, {"old-default": old, "default": default.damping, "auto": auto.damping}, \
        auto.damping_rule["criterion"]


def relative(sp, factor: float) -> dict[str, float]:
    return {name: factor * float(e.mean()) for name, e in sp.eigenvalues.items()}


def absolute(sp, factor: float) -> dict[str, float]:
    total = sum(float(e.sum()) for e in sp.eigenvalues.values()) / sum(e.numel() for e in sp.eigenvalues.values())
    return {name: factor * total for name in sp.eigenvalues}


def sweep(sp, masks, outputs, ratios) -> dict:
    """LDS of every candidate on its grid (no bootstrap): the inputs of the oracle and of leave-one-task-out."""
    def lds(damping):
        return metrics.lds(sp.scores(damping), masks, outputs, bootstrap=0).mean

    grid = {"factor": [lds(relative(sp, c)) for c in FACTORS], "absolute": [lds(absolute(sp, c)) for c in FACTORS]}
    grid["mean-gradient"] = [lds({name: rules.mean_gradient_factor(ratios[name], k, rules.AUTO_EXPONENT)
                                  * float(e.mean()) for name, e in sp.eigenvalues.items()}) for k in KAPPAS]
    gcv = [rules.gcv(sp.train, sp.eigenvalues, relative(sp, c)) for c in FACTORS]
    best = FACTORS[min(range(len(FACTORS)), key=gcv.__getitem__)]
    grid["gcv"] = (f"c={best:.3g}", lds(relative(sp, best)))
    oas = {name: min(rules.oas_factor(e, sp.n), 1e6) * float(e.mean()) for name, e in sp.eigenvalues.items()}
    grid["oas"] = ("per layer", lds(oas))
    return grid


# --------------------------------------------------------------------------- leave one task out


def oracle(sp, grid: dict) -> tuple[float, dict[str, float], str]:
    """(LDS, {layer: λ}, label) of the best point of the factor and absolute grids."""
    i = max(range(len(FACTORS)), key=grid["factor"].__getitem__)
    j = max(range(len(FACTORS)), key=grid["absolute"].__getitem__)
    if grid["factor"][i] >= grid["absolute"][j]:
        return grid["factor"][i], relative(sp, FACTORS[i]), f"{FACTORS[i]:.3g}"
    return grid["absolute"][j], absolute(sp, FACTORS[j]), f"{FACTORS[j]:.3g} x model mean (one λ)"


def fit(units: list[dict], family: str, constants: list[float]) -> dict[str, float]:
    """Per curvature method, the constant of ``family``'s grid with the least mean regret over ``units``."""
    out = {}
    for method in CURVATURES:
        group = [u for u in units if u["curvature"] == method]
        regret = [sum(u["oracle"] - u["grid"][family][i] for u in group) for i in range(len(constants))]
        out[method] = constants[min(range(len(constants)), key=regret.__getitem__)]
    return out


def loto(units: list[dict]) -> list[dict]:
    """Every candidate's LDS on each held-out task with constants chosen on the other tasks."""
    rows = []
    for task in dict.fromkeys(u["task"] for u in units):
        others = [u for u in units if u["task"] != task]
        factors, kappas = fit(others, "factor", FACTORS), fit(others, "mean-gradient", KAPPAS)
        for u in (u for u in units if u["task"] == task):
            m = u["curvature"]
            picks = {
                "factor": (f"c={factors[m]:.3g}", u["grid"]["factor"][FACTORS.index(factors[m])]),
                "mean-gradient": (f"kappa={kappas[m]:.3g}", u["grid"]["mean-gradient"][KAPPAS.index(kappas[m])]),
                "gcv": u["grid"]["gcv"],
                "oas": u["grid"]["oas"],
            }
            for name, (constants, lds) in picks.items():
                rows.append({"task": task, "projection": u["projection"], "curvature": m, "candidate": name,
                             "constants": constants, "lds": lds, "oracle": u["oracle"], "regret": u["oracle"] - lds})
    return rows


def grid_rows(units: list[dict]) -> list[dict]:
    """Long format of every unit's grids: the LDS of each family at each constant (no bootstrap)."""
    rows = []
    for u in units:
        key = {k: u[k] for k in ("task", "projection", "curvature")}
        for family, constants in (("factor", FACTORS), ("absolute", FACTORS), ("mean-gradient", KAPPAS)):
            rows += [{**key, "family": family, "constant": c, "lds": v} for c, v in zip(constants, u["grid"][family])]
        rows += [{**key, "family": family, "constant": u["grid"][family][0], "lds": u["grid"][family][1]}
                 for family in ("gcv", "oas")]
    return rows


def shipped_matches(units: list[dict]) -> list[str]:
    """Differences between the constants fitted on every task and the shipped ones (empty: they match)."""
    factors, kappas = fit(units, "factor", FACTORS), fit(units, "mean-gradient", KAPPAS)
    print(f"\n# fitted on all tasks: default factors {factors}; auto kappa {kappas} (b = {rules.AUTO_EXPONENT})")
    problems = []
    for m in CURVATURES:
        if not math.isclose(factors[m], rules.DEFAULT_FACTORS[m], rel_tol=1e-6):
            problems.append(f"default factor of {m}: fitted {factors[m]:.4g}, shipped {rules.DEFAULT_FACTORS[m]:.4g}")
        if not math.isclose(kappas[m], rules.AUTO_KAPPA[m], rel_tol=1e-6):
            problems.append(f"auto kappa of {m}: fitted {kappas[m]:.4g}, shipped {rules.AUTO_KAPPA[m]:.4g}")
    return problems


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the five tabular tasks, 20 subsets, no ceiling; writes nothing unless --out is given")
    parser.add_argument("--tasks", default=None, help=f"comma-separated tasks (default all: {', '.join(suite.TASKS)})")
    parser.add_argument("--subsets", type=int, default=None,
                        help=f"retrained subsets per task (default {suite.SUBSETS}; --quick 20)")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when default or auto is more than {TARGET} below the oracle on a unit, or the "
                             "shipped constants differ from the ones fitted on all tasks")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for bench_damping.csv and bench_damping_loto.csv (default "
                             "benches/results/<device-slug>/)")
    args = parser.parse_args(argv)
    names = [t for t in suite.TASKS if t != "lm"] if args.quick else list(suite.TASKS)
    if args.tasks is not None:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in names if t not in suite.TASKS]
        if bad or not names:
            parser.error(f"--tasks: unknown {bad or names}; choose from {', '.join(suite.TASKS)}")
    args.tasks = names
    args.subsets = args.subsets if args.subsets is not None else 20 if args.quick else suite.SUBSETS
    if args.subsets < 2:
        parser.error(f"--subsets must be >= 2, got {args.subsets}")
    return args


def run_task(name: str, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    task = suite.task(name)
    start = time.perf_counter()
    plan, outputs = suite.ground_truth(task, args.subsets)
    m, inits = CEILING.get(name, (args.subsets, (1, 2)))
    ceiling = None if args.quick else suite.ceiling(task, min(m, args.subsets), inits, subsets=args.subsets).mean
    model = suite.full_model(task)
    print(f"\n# task {name}: n_train {task.n_train}, {outputs.shape[1]} queries, {args.subsets} subsets, ceiling "
          f"{'-' if ceiling is None else f'{ceiling:.3f}'} (truth ready in {time.perf_counter() - start:.0f} s)",
          flush=True)
    rows, units = [], []
    for projection in PROJECTIONS:
        for curvature in CURVATURES:
            key = dict(task=name, projection=projection, curvature=curvature)
            if (name, projection, curvature) in SKIP:
                rows.append({**key, "status": SKIP[name, projection, curvature]})
                continue
            start = time.perf_counter()
            sp, dampings, ratios = unit(task, model, projection, curvature)
            grid = sweep(sp, plan.masks, outputs, ratios)
            best, best_damping, where = oracle(sp, grid)
            units.append({**key, "grid": grid, "oracle": best})
            for rule, damping in dampings.items():
                result = metrics.lds(sp.scores(damping), plan.masks, outputs)
                factors = sorted({f"{damping[n] / float(e.mean()):.3g}" for n, e in sp.eigenvalues.items()}, key=float)
                rows.append({**key, "rule": rule, "lds": result.mean, "lds_ci_lo": result.ci[0],
                             "lds_ci_hi": result.ci[1], "regret": best - result.mean, "ceiling": ceiling,
                             "factor": factors[0] + (f"..{factors[-1]}" if len(factors) > 1 else ""),
                             "status": "ok"})
            result = metrics.lds(sp.scores(best_damping), plan.masks, outputs)
            rows.append({**key, "rule": "oracle", "lds": result.mean, "lds_ci_lo": result.ci[0],
                         "lds_ci_hi": result.ci[1], "regret": 0.0, "factor": where, "ceiling": ceiling,
                         "status": "oracle: best of the grid on the evaluation subsets"})
            print(f"  {projection:5s} {curvature:6s} " + "  ".join(
                f"{r['rule']} {r['lds']:.3f}" for r in rows[-4:]) + f"  ({time.perf_counter() - start:.0f} s, load "
                f"{os.getloadavg()[0]:.1f})", flush=True)
    return rows, units


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    head = C.header(gpu=False)
    C.print_header(head, "airtrace bench_damping" + (" --quick" if args.quick else ""))
    rows, units = [], []
    for name in args.tasks:
        task_rows, task_units = run_task(name, args)
        rows += task_rows
        units += task_units
    C.print_table(rows, COLUMNS, title="LDS per damping rule (regret = oracle - lds)")
    loto_rows = loto(units) if len({u["task"] for u in units}) > 1 else []
    if loto_rows:
        summary = []
        for candidate in dict.fromkeys(r["candidate"] for r in loto_rows):
            mine = [r for r in loto_rows if r["candidate"] == candidate]
            summary.append({"candidate": candidate, "mean_regret": sum(r["regret"] for r in mine) / len(mine),
                            "max_regret": max(r["regret"] for r in mine),
                            **{t: max(r["regret"] for r in mine if r["task"] == t) for t in args.tasks}})
        C.print_table(summary, ("candidate", "mean_regret", "max_regret", *args.tasks),
                      title="leave-one-task-out: regret to the oracle on the held-out task (max over its units)")
    failures = shipped_matches(units) if len({u["task"] for u in units}) == len(suite.TASKS) else []
    for r in rows:
        if r.get("rule") in ("default", "auto") and r["regret"] > TARGET:
            failures.append(f"{r['task']} {r['projection']} {r['curvature']}: {r['rule']} LDS {r['lds']:.3f} is "
                            f"{r['regret']:.3f} below the oracle (target <= {TARGET})")
    print("\n## --check" if args.check else "\n## targets (not enforced without --check)")
    for line in failures:
        print(f"MISS  {line}")
    if not failures:
        print(f"PASS  default and auto within {TARGET} of the oracle on every unit; shipped constants match the fit")
    if args.quick:
        print("(--quick: few subsets, figures are a smoke test, not results)")
    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        path = C.write_csv(out / "bench_damping.csv", rows, COLUMNS, head)
        C.write_csv(out / "bench_damping_loto.csv", loto_rows, LOTO_COLUMNS, head)
        C.write_csv(out / "bench_damping_grid.csv", grid_rows(units), GRID_COLUMNS, head)
        print(f"\n# wrote {path}, bench_damping_loto.csv and bench_damping_grid.csv")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
