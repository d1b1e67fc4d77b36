#!/usr/bin/env python
"""airtrace's unprojected EK-FAC against kronfluence's on the small GPT, module set by module set, on the suite's truth.

kronfluence tracks every nn.Linear (weights and biases) with damping 0.1 x the mean eigenvalue per module
(``damping_factor=None``) and the summed answer-token loss as training loss and measurement
(``benches/peers/lm_task.py``). Each airtrace row runs the same EK-FAC with every layer unprojected
(``projection="exact"``) on a module set (``"*"``: every supported layer, token and position embeddings included;
``linear``: kronfluence's modules) and a damping (``fixed``: kronfluence's rule; ``auto``: airtrace's default).
Rows: LDS with bootstrap CI on the evaluation half of the suite's 100 retrained subsets (as
``benches/bench_quality_suite.py``), and the per-query Pearson correlation of the scores with kronfluence's (mean and
minimum over queries). Run with the peers' interpreter (kronfluence must import):

    PYTHONPATH=$PWD/python /work/main/.venv-peers/bin/python benches/bench_lm_layers.py
        # -> benches/results/<device>/bench_lm_layers.csv
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES))
import _common as C  # noqa: E402
from bench_quality_suite import LINEAR_SETTING, _attributed  # noqa: E402

from airtrace.eval import metrics, suite  # noqa: E402

COLUMNS = ("modules", "damping", "lds", "lds_ci_lo", "lds_ci_hi", "pearson_kron", "pearson_kron_min", "width",
           "seconds", "status")
MODULES = {
    "*": ("*",),
    "linear": LINEAR_SETTING["layers"],
    "linear + wte": (*LINEAR_SETTING["layers"], "wte"),
    "linear + wpe": (*LINEAR_SETTING["layers"], "wpe"),
}
"""Module set name -> layer patterns (``wte``: token embedding, ``wpe``: position embedding)."""
DAMPINGS = {"fixed": None, "auto": "auto"}


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(q,) Pearson correlation of each row of a (q, n) with the same row of b (q, n)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benches/results/<device>)")
    args = parser.parse_args(argv)
    if (reason := C.peer_unavailable("kronfluence")) is not None:
        parser.error(f"kronfluence {reason}: run with the peers' interpreter")
    from peers.lm_task import score_kronfluence

    torch.set_num_threads(1)
    head = C.header(gpu=False)
    C.print_header(head, "airtrace bench_lm_layers")
    task = suite.task("lm")
    plan, outputs = suite.ground_truth(task, suite.SUBSETS)
    masks, truth = plan.masks[suite.SUBSETS // 2:], outputs[suite.SUBSETS // 2:]
    rows = []

    def row(modules: str, damping: str, scores: torch.Tensor, seconds: float, width: int | None, peer=None):
        result = metrics.lds(scores, masks, truth)
        r = pearson_rows(scores, peer) if peer is not None else None
        rows.append({"modules": modules, "damping": damping, "lds": result.mean, "lds_ci_lo": result.ci[0],
                     "lds_ci_hi": result.ci[1], "pearson_kron": None if r is None else float(r.mean()),
                     "pearson_kron_min": None if r is None else float(r.min()), "width": width,
                     "seconds": seconds, "status": "ok"})
        print(f"  {modules:14s} {damping:6s} LDS {result.mean:.4f} [{result.ci[0]:.3f}, {result.ci[1]:.3f}]"
              + ("" if r is None else f"  Pearson with kronfluence {float(r.mean()):.4f} (min {float(r.min()):.3f})")
              + f"  {seconds:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)

    start = time.perf_counter()
    kron = score_kronfluence("ekfac", task, suite.full_model(task))  # wraps the model it is given: a fresh one
    row("kronfluence", "fixed", kron, time.perf_counter() - start, None)
    with tempfile.TemporaryDirectory(prefix="bench_lm_layers-") as tmp:
        for modules, layers in MODULES.items():
            for damping, value in DAMPINGS.items():
                if modules.startswith("linear +") and damping == "auto":
                    continue  # the embedding rows isolate a module, at kronfluence's damping
                start = time.perf_counter()
                scores, at = _attributed(suite.full_model(task), task, tmp, f"{modules}-{damping}", layers=layers,
                                         bias=True, projection="exact", curvature="ekfac", damping=value)
                row(modules, damping, scores, time.perf_counter() - start, at.width, kron)
    C.print_table(rows, COLUMNS, title="unprojected EK-FAC by module set, LDS on the evaluation half")
    out = C.results_dir(args.out, False, head)
    print(f"wrote {C.write_csv(out / 'bench_lm_layers.csv', rows, COLUMNS, head)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
