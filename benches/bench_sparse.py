#!/usr/bin/env python
"""Sparse vs dense random projection: kernel speed at equal k, featurization speed and LDS on the LM task.

- kernel: ``project_sparse`` (s = 1, 2, 4) against ``project_dense`` (rademacher) on the cpu
  backend, B = 8 rows of p = 2^20 and 2^22 coordinates (a per-example gradient of a model of
  that many parameters), k = 1024 and 4096: median ms, and the speed-up at equal k.
- task: the causal-LM task of ``bench_quality.py`` (:mod:`airtrace.eval.tasks.lm_eval`: the small
  GPT, 800 training pairs, 64 queries, the cached ground truth of ``--subsets`` retrained models):
  featurize -> score with identity curvature for the dense and the sparse projections at equal
  k; featurize seconds and LDS with its bootstrap 95% interval.

    python benches/bench_sparse.py --quick       # kernel only, small shapes, writes nothing
    python benches/bench_sparse.py               # -> benches/results/<device>/bench_sparse.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import airtrace  # noqa: E402

COLUMNS = ("part", "projection", "k", "s", "shape", "ms", "speedup_vs_dense", "featurize_s", "lds", "lds_ci_lo",
           "lds_ci_hi", "note")
SEED = 7


def kernel_rows(ps: list[int], ks: list[int], batch: int) -> list[dict]:
    rows = []
    for p in ps:
        X = torch.randn(batch, p, generator=torch.Generator().manual_seed(p))
        for k in ks:
            shape = f"B={batch} p={p} k={k}"
            dense, _ = C.median_time(lambda: airtrace.project_dense(X, k, SEED, backend="cpu"), 3)
            rows.append({"part": "kernel", "projection": "dense", "k": k, "shape": shape, "ms": dense,
                         "speedup_vs_dense": 1.0, "note": "rademacher, cpu backend"})
            for s in (1, 2, 4):
                ms, _ = C.median_time(lambda: airtrace.project_sparse(X, k, s, SEED, backend="cpu"), 5)
                rows.append({"part": "kernel", "projection": "sparse", "k": k, "s": s, "shape": shape, "ms": ms,
                             "speedup_vs_dense": dense / ms, "note": "cpu backend"})
            print(f"# {shape}: dense {dense:.1f} ms, sparse " + ", ".join(
                f"s={r['s']} {r['ms']:.2f} ms" for r in rows[-3:]), flush=True)
    return rows


def task_rows(ks: list[int], subsets: int) -> list[dict]:
    from airtrace.eval.tasks import lm_eval
    from airtrace.eval.tasks.lm import LMConfig

    methods = {}
    for k in ks:
        methods[f"dense k={k}"] = dict(projection=dict(type="dense", k=k, seed=0), curvature="identity")
        for s in (1, 2, 4):
            methods[f"sparse k={k} s={s}"] = dict(projection=dict(type="sparse", k=k, s=s, seed=0),
                                                  curvature="identity")
    rows = []
    for result in lm_eval.evaluate(LMConfig(), methods, m=subsets, progress=False):
        projection = methods[result.method]["projection"]
        rows.append({"part": "lm task", "projection": projection["type"], "k": projection["k"],
                     "s": projection.get("s"), "shape": "800 train x 64 queries, identity curvature",
                     "featurize_s": result.featurize_s, "lds": result.lds.mean, "lds_ci_lo": result.lds.ci[0],
                     "lds_ci_hi": result.lds.ci[1], "note": f"LDS over {subsets} retrained models"})
        print(f"# {result.method}: featurize {result.featurize_s:.1f} s, LDS {result.lds.mean:.4f} "
              f"[{result.lds.ci[0]:.4f}, {result.lds.ci[1]:.4f}]", flush=True)
    for row in rows:
        dense = next(r for r in rows if r["projection"] == "dense" and r["k"] == row["k"])
        row["speedup_vs_dense"] = dense["featurize_s"] / row["featurize_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=100, help="retrained models of the LDS (default 100, cached)")
    parser.add_argument("--no-task", action="store_true", help="kernel only")
    parser.add_argument("--quick", action="store_true", help="kernel only, p = 2^18; write no CSV")
    parser.add_argument("--out", type=Path, help="CSV folder (default benches/results/<device>/)")
    args = parser.parse_args(argv)
    head = C.header(gpu=False)
    C.print_header(head, "bench_sparse: project_sparse vs project_dense at equal k (CPU)")
    ps, ks = ([2**18], [1024]) if args.quick else ([2**20, 2**22], [1024, 4096])
    rows = kernel_rows(ps, ks, 8)
    if not (args.quick or args.no_task):
        rows += task_rows([1024, 4096], args.subsets)
    C.print_table(rows, COLUMNS, "sparse vs dense projection")
    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        print(f"wrote {C.write_csv(out / 'bench_sparse.csv', rows, COLUMNS, head)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
