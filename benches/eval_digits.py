"""Attribution quality on scikit-learn digits, against models really retrained: LDS, LOO, mislabel AUC, top-k removal.

Usage (from the repository root)::

    python benches/eval_digits.py            # full: 50 retrained 50% subsets per model, 100 LOO retrains
    python benches/eval_digits.py --quick    # smoke pass: small split, 8 subsets

Writes benches/results/<device>/eval_digits.csv (one row per experiment x model x
method). Retrained ground truth is cached under $AIRTRACE_CACHE/eval (default
~/.cache/airtrace/eval), so a rerun only recomputes the attributions.

Targets: none stated here (tests/test_eval_digits.py holds the checked quality claims);
``--check`` is accepted like in every bench.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_check_flag, device_slug, header, print_header, report_targets  # noqa: E402

from airtrace.eval import experiments  # noqa: E402
from airtrace.eval.tasks.digits import DigitsTask, digits_config  # noqa: E402

FIELDS = ["experiment", "model", "method", "value", "ci_lo", "ci_hi", "extra", "seconds", "loadavg"]
GRADIENT = ["identity", "kfac", "ekfac", "fisher", "trak"]


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0] if Path("/proc/loadavg").exists() else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small split and few subsets (smoke pass)")
    parser.add_argument("--out", type=Path, help="CSV path (default benches/results/<device>/eval_digits.csv)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the models are tiny, more threads only contend)")
    add_check_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    head = header()
    print_header(head, "airtrace eval: digits")
    size = dict(n_train=300, n_query=30) if args.quick else {}
    subsets, n_removed, topk_queries = (8, 20, 3) if args.quick else (50, 100, 10)
    rows = []

    def add(experiment, model, result, value, ci=(None, None), extra=""):
        row = {"experiment": experiment, "model": model, "method": result["method"],
               "value": "" if value != value else f"{value:.4f}",
               "ci_lo": "" if ci[0] is None else f"{ci[0]:.4f}", "ci_hi": "" if ci[1] is None else f"{ci[1]:.4f}",
               "extra": extra, "seconds": f"{result.get('seconds', float('nan')):.2f}", "loadavg": loadavg()}
        rows.append(row)
        print("  ".join(f"{key}={row[key]}" for key in FIELDS), flush=True)

    def timed(experiment, model, run):
        """Run one experiment; add a ground-truth row with its wall time less the attributions' (retraining)."""
        start = time.perf_counter()
        results = run()
        retrain_s = time.perf_counter() - start - sum(r.get("seconds", 0.0) for r in results)
        add(experiment, model, {"method": "ground-truth", "seconds": retrain_s}, float("nan"),
            extra="retraining wall time (0 when cached)")
        return results

    for model in ("mlp", "logreg"):
        methods = GRADIENT + (["exact"] if model == "logreg" else [])
        task = DigitsTask(digits_config(model, **size))
        for r in timed(f"lds-{subsets}x50%", model, lambda: experiments.run_lds(task, methods, subsets=subsets)):
            add(f"lds-{subsets}x50%", model, r, r["lds"], (r["ci_lo"], r["ci_hi"]))
        if model == "logreg":
            for r in timed(f"loo-{n_removed}", model, lambda: experiments.run_loo(task, methods, n_removed=n_removed)):
                add(f"loo-{n_removed}", model, r, r["loo_pearson"], extra=f"spearman={r['loo_spearman']:.4f}")
        flipped = DigitsTask(digits_config(model, flip_fraction=0.1, **size))
        for r in experiments.run_mislabel(flipped, methods):
            add("mislabel-10%", model, r, r["mislabel_auc"])
    task = DigitsTask(digits_config("mlp", **size))
    topk = f"top20-removal-{topk_queries}q"
    for r in timed(topk, "mlp", lambda: experiments.run_topk(task, ["identity", "ekfac"], k=20, n_queries=topk_queries)):
        add(topk, "mlp", r, r["topk_change"], extra=f"random={r['random_change']:.4f}")

    out = args.out or Path(__file__).resolve().parent / "results" / device_slug(head) / "eval_digits.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        for key, value in head.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    return report_targets([], args.check)


if __name__ == "__main__":
    sys.exit(main())
