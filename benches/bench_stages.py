#!/usr/bin/env python
"""Per-stage time breakdown of the default demo (SmolLM2-135M on chatterbot pairs, LoGra + EK-FAC).

Runs :func:`airtrace.demo.run.run` once under ``torch.profiler`` (a fresh output
folder, so featurize, fit and score all run) and sums the pipeline's named ranges
(:mod:`airtrace.profiling`): capture (forward + backward, without the projection
inside it), project, store_write, fit_update, store_read, precondition, score.
"other" is the profiled wall time of featurize + fit + score outside every range
(batch collation, progress bars, store open/verify, eigendecompositions, ...).
Times include the profiler's own overhead.

    python benches/bench_stages.py --quick       # 48 training pairs, writes nothing
    python benches/bench_stages.py               # the demo's default 600 pairs -> results/<device>/stages.csv
    python benches/bench_stages.py --train 200 --trace /tmp/demo-trace.json   # keep the Chrome trace

Targets: none (a breakdown, not a claim); ``--check`` is accepted like in every bench.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from airtrace import profiling  # noqa: E402
from airtrace.demo import run as demo  # noqa: E402

COLUMNS = ("stage", "calls", "exclusive_ms", "total_ms", "share_pct", "n_train")
QUICK_TRAIN = 48


def measure(n_train: int, trace: Path) -> tuple[dict[str, profiling.StageTime], dict[str, float]]:
    """Run the demo on ``n_train`` pairs under the profiler; (stage times, demo step seconds)."""
    with tempfile.TemporaryDirectory(prefix="airtrace-stages-") as out:
        with profiling.profile(trace):
            result = demo.run(out, n_train=n_train, progress=False, log=lambda line: print(f"# {line}"))
    return profiling.stage_times(trace), result.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TRAIN} training pairs; write no CSV")
    parser.add_argument("--train", type=int, default=None, help=f"training pairs (default {demo.DEFAULT_TRAIN})")
    parser.add_argument("--trace", type=Path, help="keep the Chrome trace here (default: a temporary file)")
    C.add_check_flag(parser)
    args = parser.parse_args(argv)
    n_train = args.train or (QUICK_TRAIN if args.quick else demo.DEFAULT_TRAIN)
    head = C.header(gpu=False)
    C.print_header(head, f"bench_stages: demo stage breakdown, {n_train} training pairs")
    with tempfile.TemporaryDirectory() as tmp:
        trace = args.trace or Path(tmp) / "trace.json"
        start = time.perf_counter()
        times, seconds = measure(n_train, trace)
        wall = time.perf_counter() - start
    head["load_avg"] += " -> " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    pipeline_ms = 1e3 * sum(seconds[s] for s in ("featurize", "fit", "score"))
    inside = sum(t.exclusive_ms for t in times.values())
    rows = [{"stage": t.name, "calls": t.calls, "exclusive_ms": t.exclusive_ms, "total_ms": t.total_ms,
             "share_pct": 100 * t.exclusive_ms / pipeline_ms, "n_train": n_train} for t in times.values()]
    rows.append({"stage": "other", "exclusive_ms": pipeline_ms - inside, "share_pct": 100 * (1 - inside / pipeline_ms),
                 "n_train": n_train})
    C.print_table(rows, COLUMNS, title="stages (exclusive: nested stages subtracted; share of featurize+fit+score)")
    print("\n# demo steps (s, profiled): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
          + f"; whole run {wall:.1f} s; load_avg {head['load_avg']}")
    if not args.quick:
        path = C.RESULTS / C.device_slug(head) / "stages.csv"
        C.write_csv(path, rows, COLUMNS, head)
        print(f"# wrote {path}")
    return C.report_targets([], args.check)


if __name__ == "__main__":
    sys.exit(main())
