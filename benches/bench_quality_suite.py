#!/usr/bin/env python
"""airtrace's attribution quality on the development suite: the default, the fixed damping, calibrated, the oracle,
the exact solver and a 5-model ensemble, against the same retrained ground truth.

Tasks: the tabular tasks of :data:`airtrace.eval.suite.TASKS` (digits and wine logistic regression and MLP,
diabetes MLP; ``--tasks lm`` adds the small GPT, slow on 2 cores). Ground truth: the suite's 100 retrained
50% subsets (cached, :func:`airtrace.eval.suite.ground_truth`) and its noise ceiling. The subsets are
split in two halves: ``calibrate`` chooses on the first (cross-validated inside it,
:func:`airtrace.eval.calibrate.choose`); every row is measured on the second, the evaluation half:

- ``default``: the default projection (layers with at most 65536 gradient entries unprojected, EK-FAC's exact budget;
  LoGra 16 x 16 beyond), EK-FAC, ``damping="auto"`` (weights and biases; what ``Attributor`` does);
- ``fixed``: the same with the fixed factor (``damping=None``, 0.1 x mean eigenvalue);
- ``calibrated``: the setting ``choose`` picked on the first half (sizes 8/16/32 x ekfac/kfac/fisher x
  factors 1e-3..10 and auto x inner/cosine/relative);
- ``oracle``: the best of that grid on the evaluation half itself (marked: it sees the evaluation subsets);
- ``exact``: ``curvature="exact"`` (every layer unprojected, CG on the Gauss-Newton matrix preconditioned by
  EK-FAC, damping auto: the stationary L2 strength), with its iterations, residual and λ;
- ``loo`` (logistic regressions, convex): the exact solver's scores against the explicit dense inverse at the
  same damping, and against real leave-one-out retraining (Newton to the optimum) of
  ``--loo`` examples: Pearson over (query, removed example) pairs, per query, averaged;
- ``ensemble-5`` (MLP tasks and the GPT): the default setting on 5 models trained from initial weights 0..4
  (:func:`airtrace.eval.suite.reinitialised`; the GPT's example order too), scores averaged;
- ``linear`` and ``ensemble-5 linear`` (the GPT): every nn.Linear unprojected, EK-FAC, damping auto (kronfluence's
  modules, :data:`LINEAR_SETTING`) on one model and on the same 5;
- ``kronfluence ekfac`` (the GPT, when kronfluence imports: run the bench with the peers' interpreter): its EK-FAC
  in the full layer space (``benches/peers/lm_task.py``) on the same truth.

``--skip ceiling,exact,ensemble`` leaves out the parts a 2-core CPU cannot afford on the GPT (its ceiling retrains
every subset from two more initialisations, its ensemble trains four more models, and its exact solver's
Gauss-Newton product costs about 13 s per query column per pass over the 800 training pairs there: one CG
iteration for the 64 queries is about 15 minutes).

Peers (kronfluence, dattri, TRAK, LogIX) are run by ``benches/bench_quality.py``, not here. ``--check`` exits 1
when a target of :func:`targets` is missed.

    .venv/bin/python benches/bench_quality_suite.py --quick   # wine tasks only, writes nothing
    .venv/bin/python benches/bench_quality_suite.py           # -> benches/results/<device>/bench_quality_suite.csv
"""

from __future__ import annotations

import argparse
import inspect
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

from airtrace.attribute import Attributor, score_ensemble  # noqa: E402
from airtrace.eval import metrics, suite  # noqa: E402
from airtrace.eval.cache import cache_dir  # noqa: E402
from airtrace.eval.calibrate import choose  # noqa: E402
from airtrace.eval.retrain import leave_one_out  # noqa: E402

COLUMNS = ("task", "method", "lds", "lds_ci_lo", "lds_ci_hi", "loo_pearson", "seconds", "ceiling", "detail",
           "status")
PROJECTION = dict(k_in=16, k_out=16, seed=0)
ENSEMBLE = 5
LINEAR_SETTING = dict(layers=("blocks.*", "lm_head"), bias=True, projection="exact", curvature="ekfac",
                      damping="auto")
"""The GPT's like-for-like setting with kronfluence: its modules (every nn.Linear), unprojected EK-FAC."""
QUICK_TASKS = ("wine-logreg", "wine-mlp")


class SkipRow(Exception):
    """A row left out on request (--skip)."""


def _matrix(at: Attributor, task, store, metric: str, tmp: str) -> torch.Tensor:
    """(q, n) scores with rows in query order and columns in training-row order (the GPT's batches group examples
    by length: neither follows the batch order)."""
    path = os.path.join(tmp, "scores.safetensors")
    result = at.score(task.query_batches(256), store, topk=1, metric=metric, full_matrix_path=path, progress=False)
    scores = load_file(path)["scores"].double()
    return scores[torch.tensor(result.query_ids).argsort()][:, torch.tensor(store.ids).argsort()]


def _fitted(model, task, tmp: str, name: str, **settings) -> tuple[Attributor, object]:
    """Featurize and fit one setting; (the Attributor, its store)."""
    train = task.train_batches(256)
    at = Attributor(model, loss_fn=task.loss_fn, **settings)
    store = at.featurize(train, os.path.join(tmp, name), dtype="float32", progress=False)
    at.fit(train, store=store, progress=False)
    return at, store


def _attributed(model, task, tmp: str, name: str, metric: str = "inner", **settings) -> tuple[torch.Tensor, object]:
    """Featurize, fit and score one setting; (scores (q, n), the Attributor)."""
    at, store = _fitted(model, task, tmp, name, **settings)
    return _matrix(at, task, store, metric, tmp), at


def loo_rows(name: str, task, model, exact: torch.Tensor, tmp: str, n_removed: int) -> list[dict]:
    """The exact solver's (q, n) scores against the dense inverse and against real leave-one-out retraining."""
    rows = []
    start = time.perf_counter()
    dense, at = _attributed(model, task, tmp, "dense", curvature="exact", bias=True, solver="dense")
    agree = metrics.loo_correlation(exact, dense)["pearson"]
    rows.append({"task": name, "method": "loo: exact vs dense", "loo_pearson": agree,
                 "seconds": time.perf_counter() - start, "status": "ok",
                 "detail": f"explicit (H + D)⁻¹ at the same damping {at.curvature.damping_rule['rule']}, "
                           f"p = {at.width}"})
    start = time.perf_counter()
    n = task.n_train
    indices = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:min(n_removed, n)]
    warm = "init" in inspect.signature(task.train_fn).parameters  # Newton from the full optimum (digits)
    train_fn = (lambda rows_, seed: task.train_fn(rows_, seed, init=model)) if warm else task.train_fn
    full, removed = leave_one_out(n, train_fn, task.measure_fn,
                                  cache_dir(task.config_dict) / f"loo-r{len(indices)}-s0", indices=indices,
                                  progress=False, config=task.config_dict)
    actual = full[:, None] - removed.T  # (q, removed): what removing each example costs each query
    result = metrics.loo_correlation(exact[:, indices], actual)
    rows.append({"task": name, "method": "loo: exact vs retrained", "loo_pearson": result["pearson"],
                 "seconds": time.perf_counter() - start, "status": "ok",
                 "detail": f"{len(indices)} examples left out, Newton retrains to the optimum; "
                           f"Spearman {result['spearman']:.3f}"})
    for r in rows:
        print(f"  {r['method']:24s} Pearson {r['loo_pearson']:.4f}  {r['seconds']:6.1f} s  {r['detail']}", flush=True)
    return rows


def run_task(name: str, subsets: int, n_removed: int, skip: set[str]) -> list[dict]:
    task = suite.task(name)
    plan, outputs = suite.ground_truth(task, subsets)
    half = subsets // 2
    choice_masks, choice_outputs = plan.masks[:half], outputs[:half]
    masks, truth = plan.masks[half:], outputs[half:]
    ceiling = None if "ceiling" in skip else suite.ceiling(task, subsets, (1, 2), subsets=subsets).mean
    model = suite.full_model(task)
    print(f"\n# task {name}: n_train {task.n_train}, {outputs.shape[1]} queries, {subsets} subsets "
          f"({half} to choose, {subsets - half} to evaluate), ceiling "
          f"{'not measured' if ceiling is None else format(ceiling, '.3f')}", flush=True)
    rows = []

    def row(method: str, scores: torch.Tensor | None, seconds: float, detail: str = "", status: str = "ok"):
        result = metrics.lds(scores, masks, truth) if scores is not None else None
        rows.append({"task": name, "method": method, "lds": None if result is None else result.mean,
                     "lds_ci_lo": None if result is None else result.ci[0],
                     "lds_ci_hi": None if result is None else result.ci[1], "seconds": seconds, "ceiling": ceiling,
                     "detail": detail, "status": status})
        shown = "-" if result is None else f"{result.mean:.3f} [{result.ci[0]:.3f}, {result.ci[1]:.3f}]"
        print(f"  {method:12s} {shown}  {seconds:6.1f} s  {detail}  (load {os.getloadavg()[0]:.1f})", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_quality_suite-") as tmp:
        common = dict(bias=True, projection=PROJECTION, curvature="ekfac")
        start = time.perf_counter()
        default, _ = _attributed(model, task, tmp, "default", damping="auto", **common)
        row("default", default, time.perf_counter() - start, "default projection (exact budget 65536, 16x16 beyond), "
            "EK-FAC, damping auto")
        start = time.perf_counter()
        fixed, _ = _attributed(model, task, tmp, "fixed", damping=None, **common)
        row("fixed", fixed, time.perf_counter() - start, "default projection, EK-FAC, damping 0.1 x mean eigenvalue")

        start = time.perf_counter()
        train, queries = task.train_batches(256), task.query_batches(256)
        cal = choose(model, task.loss_fn, train, queries, choice_outputs, choice_masks, bias=True)
        s = cal.settings
        scores, _ = _attributed(model, task, tmp, "calibrated", metric=s["metric"], **cal.attributor_kwargs())
        row("calibrated", scores, time.perf_counter() - start,
            f"k {s['projection']['k_in']} {s['curvature']} damping {s['damping']} {s['metric']}; "
            f"held-out LDS on the choice half {cal.lds['mean']:.3f}")
        start = time.perf_counter()
        oracle = choose(model, task.loss_fn, train, queries, truth, masks, bias=True)
        best = max(oracle.grid, key=lambda c: c["lds"])
        rows.append({"task": name, "method": "oracle", "lds": best["lds"], "seconds": time.perf_counter() - start,
                     "ceiling": ceiling, "detail": f"k {best['k']} {best['curvature']} damping {best['damping']} "
                     f"{best['metric']}", "status": "oracle: best of the grid on the evaluation subsets"})
        print(f"  {'oracle':12s} {best['lds']:.3f}  ({rows[-1]['detail']})", flush=True)

        start = time.perf_counter()
        try:
            if "exact" in skip:
                raise SkipRow("not run (--skip exact)")
            scores, at = _attributed(model, task, tmp, "exact", curvature="exact", bias=True)
            report, rule = at.solver.reports[-1], at.curvature.damping_rule
            lam = rule["criterion"]["lambda"] if rule["rule"] == "stationary" else "EK-FAC auto factors"
            row("exact", scores, time.perf_counter() - start,
                f"cg (EK-FAC-preconditioned, GGN, damping {rule['rule']} λ = {lam:.3g}): {report.iterations} "
                f"iterations, residual {report.residual:.2g}, p = {at.width}")
            if suite.seed_free(task):
                rows.extend({**r, "ceiling": ceiling} for r in loo_rows(name, task, model, scores, tmp, n_removed))
        except SkipRow as exc:
            row("exact", None, 0.0, status=str(exc))
        except ValueError as exc:  # SolverError included: reported, not hidden
            row("exact", None, time.perf_counter() - start, status=f"failed: {exc}")

        if suite.is_lm(task) and (reason := C.peer_unavailable("kronfluence")) is None:
            from peers.lm_task import score_kronfluence

            start = time.perf_counter()
            row("kronfluence ekfac", score_kronfluence("ekfac", task, model), time.perf_counter() - start,
                "kronfluence 1.0.1 EK-FAC, full layer space (benches/peers/lm_task.py)")
        elif suite.is_lm(task):
            row("kronfluence ekfac", None, 0.0, status=f"not run: kronfluence {reason}")

        if (getattr(task.config, "model", None) == "mlp" or suite.is_lm(task)) and "ensemble" not in skip:
            settings = {"": ("default setting", dict(damping="auto", **common))}
            if suite.is_lm(task):
                settings[" linear"] = ("every nn.Linear unprojected, EK-FAC, damping auto", LINEAR_SETTING)
            for suffix, (what, kwargs) in settings.items():
                seconds, members, alone = 0.0, [], []
                for k in range(ENSEMBLE):
                    start = time.perf_counter()
                    at, store = _fitted(suite.full_model(suite.reinitialised(task, k)), task, tmp,
                                        f"member{suffix}-{k}", **kwargs)
                    seconds += time.perf_counter() - start
                    members.append((at, store))
                    single = _matrix(at, task, store, "inner", tmp)  # not timed: each member's own LDS
                    alone.append(metrics.lds(single, masks, truth, bootstrap=0).mean)
                    if k == 0 and suffix:
                        row(suffix.strip(), single, seconds, f"{what} (kronfluence's modules), one model")
                start = time.perf_counter()
                path = os.path.join(tmp, "ensemble.safetensors")
                result = score_ensemble(members, queries, topk=1, full_matrix_path=path, progress=False)
                scores = load_file(path)["scores"][torch.tensor(result.query_ids).argsort()]
                scores = scores[:, torch.tensor(members[0][1].ids).argsort()]
                row(f"ensemble-{ENSEMBLE}{suffix}", scores, seconds + time.perf_counter() - start,
                    f"{what} on models from initial weights 0..{ENSEMBLE - 1}, mean of the scores; each model "
                    f"alone {' / '.join(f'{v:.3f}' for v in alone)}")
    return rows


def targets(rows: list[dict]) -> list[str]:
    """The target lines of the suite (:func:`benches._common.target`)."""
    lines = []
    get = {(r["task"], r["method"]): r for r in rows}
    for task in dict.fromkeys(r["task"] for r in rows):
        oracle = get[task, "oracle"]["lds"]
        for method, margin in (("default", 0.03), ("calibrated", 0.01)):
            lines.append(C.target(f"{task}: {method} LDS within {margin} of the oracle ({oracle:.3f})",
                                  get[task, method]["lds"], oracle - margin))
        for method, goal in (("loo: exact vs dense", 0.99), ("loo: exact vs retrained", 0.95)):
            if (task, method) in get:
                lines.append(C.target(f"{task}: {method} Pearson", get[task, method]["loo_pearson"], goal))
        if (task, "kronfluence ekfac") in get and get[task, "kronfluence ekfac"]["lds"] is not None:
            ours = max((r for r in rows if r["task"] == task and r["method"] != "kronfluence ekfac"
                        and r.get("lds") is not None), key=lambda r: r["lds"])
            peer = get[task, "kronfluence ekfac"]["lds"]
            lines.append(C.target(f"{task}: best airtrace LDS ({ours['method']}) - kronfluence EK-FAC ({peer:.3f})",
                                  ours["lds"] - peer, 0.03))
        if (task, f"ensemble-{ENSEMBLE}") in get:
            single = get[task, "default"]["lds"]
            lines.append(C.target(f"{task}: ensemble-{ENSEMBLE} LDS, the default + 0.05",
                                  get[task, f"ensemble-{ENSEMBLE}"]["lds"], single + 0.05))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_suite_arguments(parser, QUICK_TASKS, suite.SUBSETS)
    parser.add_argument("--loo", type=int, default=100, help="examples left out for the LOO checks (default 100)")
    parser.add_argument("--skip", default="", help="comma-separated parts not run: ceiling, exact, ensemble "
                                                   "(e.g. the GPT on a 2-core CPU)")
    C.add_check_flag(parser)
    args = parser.parse_args(argv)
    names = C.suite_task_names(parser, args, QUICK_TASKS, list(suite.TASKS))
    torch.set_num_threads(1)
    head = C.header(gpu=False)
    C.print_header(head, "airtrace bench_quality_suite" + (" --quick" if args.quick else ""))
    skip = {part for part in args.skip.split(",") if part}
    if skip - {"ceiling", "exact", "ensemble"}:
        parser.error(f"--skip: unknown {sorted(skip - {'ceiling', 'exact', 'ensemble'})}; "
                     "choose from ceiling, exact, ensemble")
    rows = [r for name in names for r in run_task(name, args.subsets, args.loo, skip)]
    C.print_table(rows, COLUMNS, title="LDS on the evaluation half of the subsets")
    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        print(f"wrote {C.write_csv(out / 'bench_quality_suite.csv', rows, COLUMNS, head)}")
    return C.report_targets(targets(rows), args.check)


if __name__ == "__main__":
    sys.exit(main())
