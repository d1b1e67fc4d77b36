#!/usr/bin/env python
"""Large offline scoring on the CPU (or a GPU): a 10^6 x 1024 bf16 store, 256 queries, streamed top-k.

Builds (once, cached under ``--dir``) a synthetic store of random bf16 rows,
then runs the scoring machinery of ``airtrace score`` (:func:`airtrace.scoring.stream_scores`:
prefetching shard reader with sha256 checks, ``score_topk`` per shard, running
``merge_topk``) with random float32 queries, and reports in the same run:

- rows/s, store GB/s and GFLOP/s (``2 q k`` per row) of the scoring pass;
- peak RSS the pass adds (fresh interpreter, VmHWM) against one shard's bytes
  (the reader keeps up to ``prefetch + 2`` shards alive: the one scored, the one the loop
  still holds, the one read ahead);
- the machine's memory bandwidth from a plain large tensor copy (read + write
  bytes / s) and the fp32 GEMM rate of one shard-sized ``Q @ X.T``, and the
  scoring pass as a fraction of each (with q = 256 the pass is compute bound:
  256 FLOP per stored byte);
- with ``--device cuda`` (queries on the GPU: shards stream through pinned host buffers on a
  side stream), the bandwidth is that of a pinned host -> GPU copy (``copy_gb_s`` = bytes / s
  one way), the GEMM runs on the GPU, and the store's file read rate (``read_gb_s``: every shard
  file read once, page cache warm after the warm-up pass) is reported too;
- with ``--profile``, the per-stage breakdown (store_read = waiting for the
  prefetch thread, score = kernel + merge).

    df -h /tmp                                        # the full store needs ~2.1 GB
    python benches/bench_score_large.py --quick       # 65536 rows, writes nothing
    python benches/bench_score_large.py               # 10^6 rows -> results/<device>/score_large.csv
    python benches/bench_score_large.py --rows 200000 --profile
    python benches/bench_score_large.py --device cuda --rows 10000000 --width 256 --queries 64 --rows-per-shard 65536

Target (``--check`` exits with status 1 when it is missed): the pass's extra peak memory
<= PEAK_SHARDS (4) shards, whatever the number of rows (3 alive shards plus the score tiles).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from airtrace import profiling  # noqa: E402
from airtrace.scoring import stream_scores  # noqa: E402
from airtrace.store import Store, StoreError, StoreWriter  # noqa: E402

COLUMNS = ("scored_on", "rows", "width", "queries", "topk", "rows_per_shard", "shard_mib", "seconds", "rows_per_s",
           "store_gb_s", "gflop_s", "read_gb_s", "copy_gb_s", "gemm_gflop_s", "frac_of_read", "frac_of_bandwidth",
           "frac_of_gemm", "peak_extra_mib", "peak_over_shard")
GIB = 2**30
SEED = 20251
PEAK_SHARDS = 4.0


def store_path(root: Path, rows: int, width: int, rows_per_shard: int) -> Path:
    return root / f"synthetic-{rows}x{width}-bf16-rps{rows_per_shard}-seed{SEED}"


def build_store(path: Path, rows: int, width: int, rows_per_shard: int) -> Store:
    """The cached synthetic store at ``path`` (built, or resumed, when missing or unfinished)."""
    try:
        store = Store.open(path)
        if len(store) == rows and store.width == width:
            return store
    except StoreError:
        pass
    need = rows * width * 2
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < need * 1.1:
        sys.exit(f"{path.parent}: {free / GIB:.1f} GiB free, the store needs {need / GIB:.1f} GiB; "
                 "pass --dir on a larger disk or fewer --rows")
    print(f"# building {rows} x {width} bf16 store in {path} ({need / GIB:.2f} GiB)")
    with StoreWriter(path, f"synthetic:seed{SEED}", width, "bfloat16", rows_per_shard,
                     {"synthetic": {"seed": SEED}}) as writer:
        start = writer.rows_done
        for begin in range(start, rows, rows_per_shard):
            n = min(rows_per_shard, rows - begin)
            gen = torch.Generator().manual_seed(SEED + begin)
            writer.append(torch.randn(n, width, generator=gen).to(torch.bfloat16), list(range(begin, begin + n)))
            print(f"\r# {begin + n}/{rows} rows", end="", file=sys.stderr)
    print(file=sys.stderr)
    return Store.open(path)


def queries(q: int, width: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(q, width, generator=torch.Generator().manual_seed(SEED - 1)).to(device)


def scoring_call(path: str, q: int, topk: int, device: str = "cpu"):
    """For the peak-RSS child: open the store and return the scoring pass as a callable."""
    store = Store.open(path)
    Q = queries(q, store.width, device)
    sync = C.sync_for(device)
    return lambda: (stream_scores(Q, store, topk=topk, progress=False), sync())


def copy_bandwidth(device: str, nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """CPU: bytes/s moved (read + write) by a plain ``dst.copy_(src)`` of ``nbytes`` fp32 buffers.
    GPU: bytes/s of a pinned host -> GPU copy of ``nbytes`` (one way)."""
    if device == "cuda":
        src, dst = torch.empty(nbytes // 4).pin_memory(), torch.empty(nbytes // 4, device="cuda")
        ms, _ = C.median_time(lambda: dst.copy_(src, non_blocking=True), repeats, warmup=1,
                              sync=torch.cuda.synchronize)
        return nbytes / (ms / 1e3)
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    ms, _ = C.median_time(lambda: dst.copy_(src), repeats, warmup=1)
    return 2 * nbytes / (ms / 1e3)


def gemm_rate(q: int, width: int, rows: int, device: str, repeats: int = 5) -> float:
    """FLOP/s of one fp32 ``Q @ X.T`` of a shard's size on ``device`` (the scoring pass's arithmetic)."""
    Q, X = torch.randn(q, width, device=device), torch.randn(rows, width, device=device)
    ms, _ = C.median_time(lambda: Q @ X.T, repeats, warmup=1, sync=C.sync_for(device))
    return 2 * q * width * rows / (ms / 1e3)


def read_rate(store: Store) -> float:
    """Bytes/s of reading every shard file of ``store`` once (1 MiB reads; warm page cache after a pass)."""
    files = sorted(Path(store.path).glob("shard-*.safetensors"))
    start, nbytes = time.perf_counter(), 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(2**20):
                nbytes += len(chunk)
    return nbytes / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="store rows (default 10^6)")
    parser.add_argument("--width", type=int, default=1024, help="features per row (default 1024)")
    parser.add_argument("--queries", type=int, default=256, help="queries (default 256)")
    parser.add_argument("--topk", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--rows-per-shard", type=int, default=16384, help="rows per shard (default 16384: 32 MiB)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "airtrace-bench-score-large",
                        help="where the synthetic store is cached")
    parser.add_argument("--repeats", type=int, default=2, help="timed scoring passes (median; default 2)")
    parser.add_argument("--profile", action="store_true", help="also print the per-stage breakdown of one pass")
    parser.add_argument("--quick", action="store_true", help="65536 rows, one pass; write no CSV")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the queries live and the scoring runs (default cpu)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for score_large.csv (default results/<device>/; --quick writes nothing)")
    C.add_check_flag(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here (torch.cuda.is_available() is False)")
    if args.quick:
        args.rows, args.repeats = 65536, 1
    head = C.header(gpu=args.device == "cuda")
    C.print_header(head, f"bench_score_large: {args.rows} x {args.width} bf16 store, {args.queries} queries, "
                   f"{args.device}")
    sync = C.sync_for(args.device)

    store = build_store(store_path(args.dir, args.rows, args.width, args.rows_per_shard), args.rows, args.width,
                        args.rows_per_shard)
    Q = queries(args.queries, args.width, args.device)
    stream_scores(Q, store, topk=args.topk, progress=False)  # warm the page cache and the kernels
    sync()
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        stream_scores(Q, store, topk=args.topk, progress=False)
        sync()
        seconds.append(time.perf_counter() - start)
    t = statistics.median(seconds)
    store_bytes = args.rows * args.width * 2
    flops = 2 * args.queries * args.width * args.rows
    read = read_rate(store)
    copy = copy_bandwidth(args.device)
    gemm = gemm_rate(args.queries, args.width, args.rows_per_shard, args.device)
    peak = C.peak_rss_subprocess(Path(__file__), "scoring_call",
                                 {"path": str(store.path), "q": args.queries, "topk": args.topk,
                                  "device": args.device})
    shard_bytes = args.rows_per_shard * args.width * 2
    head["load_avg"] += " -> " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    row = {"scored_on": args.device, "rows": args.rows, "width": args.width, "queries": args.queries,
           "topk": args.topk, "rows_per_shard": args.rows_per_shard, "shard_mib": shard_bytes / C.MIB, "seconds": t,
           "rows_per_s": args.rows / t, "store_gb_s": store_bytes / t / 1e9, "gflop_s": flops / t / 1e9,
           "read_gb_s": read / 1e9, "copy_gb_s": copy / 1e9, "gemm_gflop_s": gemm / 1e9,
           "frac_of_read": store_bytes / t / read, "frac_of_bandwidth": store_bytes / t / copy,
           "frac_of_gemm": flops / t / gemm, "peak_extra_mib": peak["extra_bytes"] / C.MIB,
           "peak_over_shard": peak["extra_bytes"] / shard_bytes}
    C.print_table([row], COLUMNS)
    print(f"# passes (s): {', '.join(f'{s:.2f}' for s in seconds)}; load_avg {head['load_avg']}")
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            with profiling.profile(trace):
                start = time.perf_counter()
                stream_scores(Q, store, topk=args.topk, progress=False)
                wall = (time.perf_counter() - start) * 1e3
            print("\n## one profiled pass (share of its wall time, %.0f ms)" % wall)
            print(profiling.format_stage_times(profiling.stage_times(trace), wall_ms=wall))
    status = C.report_targets([C.target("extra peak memory / one shard", row["peak_over_shard"], PEAK_SHARDS,
                                        higher_is_better=False, detail=f" ({row['peak_extra_mib']:.0f} MiB)")],
                              args.check)
    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        print(f"# wrote {C.write_csv(out / 'score_large.csv', [row], COLUMNS, head)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
