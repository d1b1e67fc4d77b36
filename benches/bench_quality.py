#!/usr/bin/env python
"""Attribution quality vs cost, airtrace against peer libraries, on the same models and ground truth.

Tasks (``--tasks``, default both):

- ``digits``: scikit-learn digits (:mod:`airtrace.eval.tasks.digits`, MLP by default): one model
  trained on every training example, and the LDS ground truth of ``--subsets`` (default 50)
  models retrained on random 50% subsets (:func:`airtrace.eval.experiments.lds_ground_truth`,
  cached). Methods: ``benches/peers/digits.py``. airtrace: LoGra 16x16 with identity / K-FAC /
  EK-FAC / damped Fisher, EK-FAC with a wider projection and exact (every layer unprojected by
  ``exact_small``, default damping), TRAK-style dense projection (k = 512)
  + damped Fisher, and the "iso" rows (every layer kept exact by ``exact_small`` + absolute
  damping 1e-3: the unprojected math). Peers: kronfluence EK-FAC (its damping heuristic, and damping 1e-3) and
  identity, traker (CPU BasicProjector, k = 512), dattri IF (explicit Hessian), TRAK (k = 512)
  and TracIn (Grad-Dot). Also "airtrace default" (the Attributor's defaults), "airtrace exact"
  (``curvature="exact"``, CG on the Gauss-Newton matrix, damping "auto") and dattri's influence with
  the true Hessian + λI by its explicit inverse, CG and Arnoldi over λ in ``peers.digits.DATTRI_GRID``.
- ``lm``: the small GPT trained from scratch on chatterbot pairs
  (:mod:`airtrace.eval.tasks.lm`, "default" size; ``--quick``: "tiny"): the full-pool model of
  :func:`airtrace.eval.tasks.lm_eval.full_model` and the ground truth of
  :func:`airtrace.eval.tasks.lm_eval.ground_truth` (``--subsets``, default 32; both cached).
  Methods: ``benches/peers/lm_task.py``. airtrace: the ``lm_eval.METHODS`` (LoGra 16x16 +
  identity / EK-FAC, dense k = 4096), LoGra 64x65 and 256x65 + EK-FAC (weights and biases), dense
  k = min(512, n/2) + damped Fisher, and the "exact" rows (EK-FAC and identity with every layer
  kept exact by ``exact_small``: kronfluence's math).
  Peers: kronfluence EK-FAC and identity (full layer space), traker (CPU BasicProjector,
  k = min(512, n/2); also with projection seed 1, to show how far two random projections of the
  same math agree), dattri TracIn (Grad-Dot) and TRAK (same k); dattri IF is listed as not run (its
  explicit Hessian does not fit).

Every method scores every query against every training example of the task's one model, in a
fresh interpreter (a peer library that does not import here gets a ``SKIPPED <peer>: <reason>``
row instead) (wall time of the attribution, peak memory above the RSS after loading the
task and model); the table gives LDS (with its bootstrap 95% interval), seconds and peak
memory, and the same-method agreement (mean per-query Spearman between two methods' score
matrices).

    .venv-peers/bin/python benches/bench_quality.py --quick   # small tasks, 8 subsets, writes nothing
    .venv-peers/bin/python benches/bench_quality.py           # -> benches/results/<device>/bench_quality.{csv,png}
    .venv-peers/bin/python benches/bench_quality.py --tasks lm  # -> .../bench_quality_lm.{csv,png}

Targets per task (the constants below; ``--check`` exits with status 1 when one is missed): the
best airtrace LDS >= the best peer's LDS; for the same-method pairs marked as targets in
AGREEMENT, the per-query Spearman of their scores >= AGREEMENT_MIN (0.9) for every query; each
airtrace method of SPEED at least as fast as its peer (t_peer / t_airtrace >= FASTER (1)); when dattri's
explicit / CG rows ran, the best airtrace LDS >= their best, and the fastest airtrace row at that LDS
at <= 1/4 of its time and peak memory (:func:`dattri_targets`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES))
import _common as C  # noqa: E402

COLUMNS = ("task", "method", "library", "lds", "lds_ci_lo", "lds_ci_hi", "seconds", "peak_extra_mib", "status")
AGREEMENT_COLUMNS = ("task", "method_a", "method_b", "spearman_mean", "spearman_min", "what", "target")
TASKS = ("digits", "lm")
AGREEMENT_MIN = 0.9
FASTER = 1.0
DEFAULT_SUBSETS = {"digits": 50, "lm": 32}
AGREEMENT = {  # (method a, method b, what, part of the >= 0.9 target)
    "digits": (
        ("airtrace ekfac iso", "kronfluence ekfac λ", "EK-FAC, same settings (unprojected math, damping 1e-3)", True),
        ("airtrace identity iso", "kronfluence identity", "gradient inner product (unprojected)", True),
        ("airtrace identity iso", "dattri tracin", "gradient inner product (Grad-Dot)", False),
        ("airtrace ekfac exact", "kronfluence ekfac", "EK-FAC, same math (unprojected, damping 0.1 x mean "
                                                     "eigenvalue)", True),
        ("airtrace ekfac", "kronfluence ekfac", "EK-FAC, each library's defaults (airtrace LoGra 16x16)", False),
        ("airtrace ekfac wide", "kronfluence ekfac", "EK-FAC, defaults; airtrace LoGra 32x65", False),
        ("airtrace trak", "traker", "TRAK dense projection k=512 (airtrace: loss gradients + damped Fisher; "
                                   "traker: margin gradients, (1-p) weights, no damping)", False),
        ("airtrace trak", "dattri trak", "TRAK dense projection k=512", False),
        ("traker", "dattri trak", "TRAK, the two peers", False),
    ),
    "lm": (
        ("airtrace logra-ekfac exact", "kronfluence ekfac", "EK-FAC, same math (unprojected weights and biases, "
                                                           "damping 0.1 x mean eigenvalue)", True),
        ("airtrace logra-identity exact", "kronfluence identity", "gradient inner product, same math (unprojected)",
         True),
        ("airtrace logra-ekfac", "kronfluence ekfac", "EK-FAC, projected vs not (airtrace LoGra 16x16; kronfluence "
                                                     "full layer space)", False),
        ("airtrace logra-ekfac 64x65", "kronfluence ekfac", "EK-FAC, projected vs not (LoGra 64x65 with biases)",
         False),
        ("airtrace logra-ekfac 256x65", "kronfluence ekfac", "EK-FAC, projected vs not (LoGra 256x65 with biases)",
         False),
        ("airtrace logra-identity", "kronfluence identity", "gradient inner product (airtrace LoGra 16x16)", False),
        ("airtrace trak-dense", "traker", "dense projection (airtrace k=4096 identity; traker k=min(512, n/2), "
                                          "(ΦᵀΦ)⁻¹)", True),
        ("airtrace trak-fisher", "traker", "dense projection, same k (airtrace damped Fisher; traker undamped "
                                           "(ΦᵀΦ)⁻¹, other random matrix)", True),
        ("kronfluence identity", "dattri tracin", "gradient inner product, the two peers (kronfluence also tracks "
                                                  "the biases)", False),
        ("traker", "dattri trak", "TRAK, same k, the two peers", False),
        ("traker", "traker seed 1", "TRAK, one library, two projection seeds: the agreement the random "
                                    "projection allows", False),
    ),
}
SPEED = {  # (airtrace method, peer method): "faster than" checks
    "digits": (("airtrace ekfac iso", "kronfluence ekfac λ"), ("airtrace identity iso", "kronfluence identity"),
               ("airtrace ekfac exact", "kronfluence ekfac"),
               ("airtrace ekfac", "kronfluence ekfac"), ("airtrace trak", "traker"), ("airtrace trak", "dattri trak")),
    "lm": (("airtrace logra-ekfac exact", "kronfluence ekfac"), ("airtrace logra-identity exact", "kronfluence identity"),
           ("airtrace logra-ekfac", "kronfluence ekfac"), ("airtrace logra-ekfac 64x65", "kronfluence ekfac"),
           ("airtrace logra-ekfac 256x65", "kronfluence ekfac"),
           ("airtrace logra-identity", "kronfluence identity"), ("airtrace trak-dense", "traker"),
           ("airtrace trak-fisher", "traker"), ("airtrace trak-fisher", "dattri trak")),
}


# --------------------------------------------------------------------------- task


def make_task(name: str, model: str, quick: bool):
    """The benchmark task ``name`` ("digits": ``model`` mlp / logreg; "lm"); ``quick``: the small size."""
    if name == "digits":
        from airtrace.eval.tasks.digits import DigitsTask, digits_config

        overrides = {"n_train": 300, "n_query": 30} if quick else {}
        return DigitsTask(digits_config(model, **overrides))
    from airtrace.eval.tasks.lm import LMTask, lm_config

    return LMTask(lm_config("tiny" if quick else "default"))


def task_label(name: str, model: str, quick: bool) -> str:
    return f"digits-{model}" if name == "digits" else f"lm-{'tiny' if quick else 'default'}"


def full_model(name: str, task):
    """The model trained on the whole pool (cached by the task's own module)."""
    if name == "digits":
        from airtrace.eval import experiments

        return experiments.full_model(task)
    from airtrace.eval.tasks import lm_eval

    return lm_eval.full_model(task)


def ground_truth(name: str, task, subsets: int):
    """(subset masks (m, n) bool, retrained outputs (m, q) float64), cached under ~/.cache/airtrace/eval."""
    if name == "digits":
        from airtrace.eval import experiments

        plan, outputs = experiments.lds_ground_truth(task, subsets, progress=False)
    else:
        from airtrace.eval.tasks import lm_eval

        outputs, plan = lm_eval.ground_truth(task, subsets, progress=False)
    return plan.masks, outputs


def task_methods(name: str) -> dict:
    """Method name -> score function (task, model) -> (q, n) float64 of task ``name``."""
    if name == "digits":
        from peers.digits import METHODS
    else:
        from peers.lm_task import METHODS
    return METHODS


def skipped_methods(name: str) -> dict:
    """Method name -> reason, for the methods of task ``name`` that are listed but not run."""
    if name == "digits":
        return {}
    from peers.lm_task import SKIPPED

    return SKIPPED


# --------------------------------------------------------------------------- child


def child(task_name: str, method: str, model: str, quick: bool, path: str) -> dict:
    torch.manual_seed(0)
    task = make_task(task_name, model, quick)
    net = full_model(task_name, task)
    score = task_methods(task_name)[method]
    C._reset_peak()
    base = C._status_bytes("VmRSS")
    start = time.perf_counter()
    scores = score(task, net)
    seconds = time.perf_counter() - start
    extra = C._status_bytes("VmHWM") - base
    torch.save(scores.to(torch.float64), path)
    return {"seconds": seconds, "extra_bytes": extra}


def run_child(task_name: str, method: str, model: str, quick: bool, path: Path, limit_gib: float,
              timeout: float) -> dict:
    kwargs = {"task_name": task_name, "method": method, "model": model, "quick": quick, "path": str(path)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(kwargs), str(limit_gib)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        last = [line for line in res.stderr.strip().splitlines() if line.strip()]
        return {"status": f"failed (exit {res.returncode}): {last[-1][:160] if last else ''}"}
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "status": "ok"}


def child_main(kwargs_json: str, limit_gib: str) -> None:
    import resource

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    limit = int(float(limit_gib) * 2**30)
    if limit > 0:  # a method that builds huge dense objects fails with MemoryError instead of swapping others out
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    print(json.dumps(child(**json.loads(kwargs_json))))


# --------------------------------------------------------------------------- report


def plot(per_task: list[tuple[str, str, list[dict]]], path: Path, suptitle: str) -> None:
    """One panel per task: LDS (with its CI) vs attribution time of every method that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_task), figsize=(8 * len(per_task), 5.5), squeeze=False)
    for ax, (label, title, rows) in zip(axes[0], per_task):
        for r in rows:
            if r.get("lds") is None:
                continue
            ours = r["library"] == "airtrace"
            ax.errorbar(r["seconds"], r["lds"], yerr=[[r["lds"] - r["lds_ci_lo"]], [r["lds_ci_hi"] - r["lds"]]],
                        fmt="o" if ours else "s", color="tab:blue" if ours else "tab:orange", capsize=3)
            ax.annotate(r["method"], (r["seconds"], r["lds"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("attribution wall time, s (log scale; featurize + fit + score, one process)")
        ax.set_ylabel("LDS (mean per-query Spearman, 95% bootstrap CI)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.plot([], [], "o", color="tab:blue", label="airtrace")
        ax.plot([], [], "s", color="tab:orange", label="peers")
        ax.legend(loc="best")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small tasks (digits: 300 training images, 30 queries; lm: the tiny size), 8 subsets; "
                             "writes nothing")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated tasks (default {','.join(TASKS)})")
    parser.add_argument("--model", choices=("mlp", "logreg"), default="mlp", help="digits model (default mlp)")
    parser.add_argument("--subsets", type=int, default=None,
                        help="retrained 50%% subsets of every task (default: digits 50, lm 32; --quick 8)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    parser.add_argument("--memory-limit-gib", type=float, default=8.0,
                        help="data-segment limit of each method's process (0: none); default 8")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per method before it is stopped")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS / torch threads for the ground truth and every method (default: "
                             "torch's default); on a loaded machine 1 avoids OpenMP barrier stalls")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for bench_quality.csv/.png (bench_quality_lm.* for --tasks lm; default "
                             "benches/results/<device-slug>/; --quick writes nothing unless --out is given)")
    C.add_check_flag(parser)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in args.tasks if t not in TASKS]
    if bad or not args.tasks:
        parser.error(f"--tasks: unknown {bad or args.tasks}; choose from {', '.join(TASKS)}")
    if args.subsets is not None and args.subsets < 2:
        parser.error(f"--subsets must be >= 2, got {args.subsets}")
    known = {name: [*task_methods(name), *skipped_methods(name)] for name in args.tasks}
    if args.methods is None:
        args.methods = known
    else:
        chosen = [m.strip() for m in args.methods.split(",")]
        bad = [m for m in chosen if not any(m in names for names in known.values())]
        if bad:
            parser.error(f"--methods: unknown {bad}; choose from "
                         + "; ".join(f"{t}: {', '.join(names)}" for t, names in known.items()))
        args.methods = {t: [m for m in chosen if m in names] for t, names in known.items()}
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: {args.out} exists and is not a folder")
    return args


def run_task(name: str, args: argparse.Namespace) -> tuple[str, str, list[dict], list[dict], list[str]]:
    """Ground truth, every method of task ``name``, the agreement table and the targets;
    (label, plot title, rows, agreement, target lines)."""
    from airtrace.eval import metrics
    from peers.lm import per_query_spearman

    task = make_task(name, args.model, args.quick)
    label = task_label(name, args.model, args.quick)
    subsets = args.subsets if args.subsets is not None else (8 if args.quick else DEFAULT_SUBSETS[name])
    n_query = len(task.queries) if name == "lm" else task.config.n_query
    print(f"\n# task     {label}: n_train {task.n_train}, n_query {n_query}, {subsets} retrained 50% subsets",
          flush=True)
    start = time.perf_counter()
    masks, outputs = ground_truth(name, task, subsets)
    print(f"# ground truth ready in {time.perf_counter() - start:.1f} s (cached under ~/.cache/airtrace)", flush=True)

    rows, scores, skipped = [], {}, skipped_methods(name)
    libraries = {method.split()[0] for method in args.methods[name]} & set(C.PEERS)
    missing = {lib: C.skipped(lib, reason) for lib in sorted(libraries) if (reason := C.peer_unavailable(lib))}
    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp:
        for method in args.methods[name]:
            row = {"task": label, "method": method, "library": method.split()[0]}
            status = skipped.get(method) or missing.get(row["library"])
            if status:
                rows.append({**row, "status": status})
                print(f"  {method:28s} {status}", flush=True)
                continue
            path = Path(tmp) / f"{len(rows)}.pt"
            r = run_child(name, method, args.model, args.quick, path, args.memory_limit_gib, args.timeout)
            row["status"] = r["status"]
            if r["status"] == "ok" and not bool(torch.isfinite(got := torch.load(path)).all()):
                row["status"] = f"failed: {int((~torch.isfinite(got)).sum())} of {got.numel()} scores NaN/Inf"
            elif r["status"] == "ok":
                scores[method] = got
                result = metrics.lds(scores[method], masks, outputs)
                row.update(lds=result.mean, lds_ci_lo=result.ci[0], lds_ci_hi=result.ci[1], seconds=r["seconds"],
                           peak_extra_mib=r["extra_bytes"] / C.MIB)
            rows.append(row)
            lds = f"LDS {row['lds']:+.3f} [{row['lds_ci_lo']:+.3f}, {row['lds_ci_hi']:+.3f}]  {row['seconds']:7.1f} s  " \
                  f"peak +{row['peak_extra_mib']:.0f} MiB" if "lds" in row else row["status"]
            print(f"  {method:28s} {lds}  (load {' '.join(f'{x:.1f}' for x in os.getloadavg())})", flush=True)

    agreement = []
    for a, b, what, target in AGREEMENT[name]:
        if a in scores and b in scores:
            rho = per_query_spearman(scores[a], scores[b])
            agreement.append({"task": label, "method_a": a, "method_b": b, "spearman_mean": float(rho.mean()),
                              "spearman_min": float(rho.min()), "what": what, "target": target})

    C.print_table(rows, COLUMNS, title=f"{label}: LDS, time and peak memory")
    C.print_table(agreement, AGREEMENT_COLUMNS, title=f"{label}: same-method agreement (per-query Spearman of scores)")
    lines = []
    done = [r for r in rows if "lds" in r]
    ours = [r for r in done if r["library"] == "airtrace"]
    peers = [r for r in done if r["library"] != "airtrace"]
    if ours:
        best = max(ours, key=lambda r: r["lds"])
        best_peer = max(peers, key=lambda r: r["lds"]) if peers else None
        lines.append(C.target(
            f"{label} best airtrace LDS ({best['method']}, {best['seconds']:.1f} s) - best peer LDS "
            f"({best_peer['method'] + ', ' + format(best_peer['seconds'], '.1f') + ' s' if best_peer else 'no peer ran'})",
            best["lds"] - best_peer["lds"] if best_peer else None, 0.0))
    lines.extend(dattri_targets(label, done))
    pairs = {(r["method_a"], r["method_b"]): r for r in agreement}
    for a, b, _, is_target in AGREEMENT[name]:
        if is_target:
            r = pairs.get((a, b))
            lines.append(C.target(f"{label} agreement {a} ~ {b}: min per-query Spearman",
                                  r["spearman_min"] if r else None, AGREEMENT_MIN,
                                  detail=f" (mean {r['spearman_mean']:.3f})" if r else ""))
    by = {r["method"]: r for r in done}
    for a, b in SPEED[name]:
        ratio = by[b]["seconds"] / by[a]["seconds"] if a in by and b in by else None
        lines.append(C.target(f"{label} t_{b} / t_{a}", ratio, FASTER))
    title = f"{label}: LDS vs attribution time ({task.n_train} train, {n_query} queries, {subsets} subsets)"
    return label, title, rows, agreement, lines


def dattri_targets(label: str, done: list[dict]) -> list[str]:
    """Best dattri explicit / CG influence (over its regularisation grid) against airtrace: an airtrace row with at
    least its LDS (the fastest such row) at <= 1/4 of its time and of its peak memory."""
    grid = [r for r in done if r["method"].startswith(("dattri explicit", "dattri cg"))]
    if not grid:
        return []
    best = max(grid, key=lambda r: r["lds"])
    ours = [r for r in done if r["library"] == "airtrace" and r["lds"] >= best["lds"]]
    row = min(ours, key=lambda r: r["seconds"]) if ours else None
    what = f"{label} vs dattri's best explicit/CG ({best['method']}, LDS {best['lds']:.3f})"
    top = max((r for r in done if r["library"] == "airtrace"), key=lambda r: r["lds"])
    lines = [C.target(f"{what}: best airtrace LDS ({top['method']}) - dattri's", top["lds"] - best["lds"], 0.0)]
    for key, name in (("seconds", "time"), ("peak_extra_mib", "peak memory")):
        ratio = row[key] / max(best[key], 1e-9) if row else None
        lines.append(C.target(f"{what}: {name} of {row['method'] if row else 'an airtrace row at its LDS'} / "
                              "dattri's", ratio, 0.25, higher_is_better=False))
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:  # inherited by every method's process
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    head = C.header(gpu=False)
    C.print_header(head, "airtrace bench_quality" + (" --quick" if args.quick else "")
                   + f" --tasks {','.join(args.tasks)}")
    results = [run_task(name, args) for name in args.tasks]
    lines = [line for *_, task_lines in results for line in task_lines]
    if args.quick:
        lines.append("n/a   (--quick: small tasks and few subsets, figures are a smoke test, not results)")
    status = C.report_targets(lines, args.check)

    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        stem = "bench_quality" if "digits" in args.tasks else "bench_quality_" + "_".join(args.tasks)
        rows = [r for _, _, task_rows, _, _ in results for r in task_rows]
        agreement = [r for _, _, _, task_agreement, _ in results for r in task_agreement]
        path = C.write_csv(out / f"{stem}.csv", rows, COLUMNS, head)
        C.write_csv(out / f"{stem}_agreement.csv", agreement, AGREEMENT_COLUMNS, head)
        png = out / f"{stem}.png"
        plot([(label, title, rows) for label, title, rows, _, _ in results], png,
             f"{head['cpu']}, {head['threads']} thread(s), load {head['load_avg']}")
        print(f"\n# wrote {path}, {out / f'{stem}_agreement.csv'} and {png}")
    return status


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
