"""``airtrace index build``: an ANN index over a store's preconditioned rows, beside the store; imports
``airtrace.index``, ``airtrace.curvature``, ``airtrace.store`` and ``airtrace.cli.args``."""

from __future__ import annotations

import argparse
import json

from airtrace.cli.args import non_negative_int, positive_float, positive_int


def _cmd_build(args: argparse.Namespace) -> int:
    from airtrace.curvature import Curvature, identity
    from airtrace.index import IndexSpec, build_index, files
    from airtrace.store import Store

    store = Store.open(args.store)
    curvature = Curvature.load(args.curvature) if args.curvature else identity(
        {block.name: tuple(block.shape) for block in store.layout})
    spec = IndexSpec(args.type, nlist=args.nlist, m=args.m, nbits=args.nbits, hnsw_m=args.hnsw_m,
                     ef_construction=args.ef_construction, train_rows=args.train_rows, seed=args.seed)
    max_memory = None if args.max_memory_gb is None else int(args.max_memory_gb * 2**30)
    path = build_index(store, curvature, spec, metric=args.metric, max_memory=max_memory,
                       checkpoint_seconds=args.checkpoint_seconds, overwrite=args.overwrite,
                       progress=not args.quiet)
    record = files.read_record(path)
    print(f"wrote {path} ({record['bytes'] / 2**20:.1f} MiB, {record['rows']} rows, "
          f"{json.dumps(record['spec'], sort_keys=True)})")
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace index`` (``build``)."""
    p = sub.add_parser("index", help="ANN index over a store for fast two-stage scoring (score --index)")
    commands = p.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    b = commands.add_parser("build", help="build (or resume) the index beside STORE",
                            description="Build an index over STORE's rows preconditioned by --curvature and scaled "
                                        "so that inner products are --metric; resumes a killed build; an index of "
                                        "the same store, curvature, metric and settings is reused.")
    b.add_argument("store", metavar="STORE", help="store written by featurize")
    b.add_argument("--curvature", metavar="CURV", help="factors written by fit, the ones score uses (default identity)")
    b.add_argument("--metric", default="inner", choices=("inner", "cosine", "relative"),
                   help="score the index serves (default inner)")
    b.add_argument("--type", default="ivfpq", choices=("flat", "ivfpq", "hnsw"),
                   help="flat: exact; ivfpq: inverted lists + product quantization (default); hnsw: graph, "
                        "only where the full vectors fit in memory")
    b.add_argument("--nlist", type=positive_int, help="ivfpq lists (default: power of two nearest sqrt(rows))")
    b.add_argument("--m", type=positive_int, help="ivfpq sub-quantizers (default ceil(width / 4))")
    b.add_argument("--nbits", type=positive_int, help="ivfpq bits per code (default 8, fewer on small stores)")
    b.add_argument("--hnsw-m", type=positive_int, help="hnsw links per node (default 32)")
    b.add_argument("--ef-construction", type=positive_int, help="hnsw build candidates (default 80)")
    b.add_argument("--train-rows", type=positive_int, help="ivfpq training sample (default 64 per list)")
    b.add_argument("--seed", type=non_negative_int, default=0, help="training sample and k-means seed (default 0)")
    b.add_argument("--max-memory-gb", type=positive_float,
                   help="refuse an index larger than this (default half the available memory)")
    b.add_argument("--checkpoint-seconds", type=positive_float, default=60.0,
                   help="seconds between checkpoints a killed build resumes from (default 60)")
    b.add_argument("--overwrite", action="store_true", help="build again even if a finished index exists")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(run=_cmd_build, parser=b)
