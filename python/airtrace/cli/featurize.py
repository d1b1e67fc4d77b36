"""``airtrace featurize``: per-example features of the training set -> a store; imports ``airtrace.attribute`` and the
other ``airtrace.cli`` modules."""

from __future__ import annotations

import argparse

from airtrace.cli.args import UsageError, non_negative_int, positive_int
from airtrace.cli.task import add_model_options, load, scaled, train_size


def _projection(args: argparse.Namespace) -> dict | str:
    if args.exact:
        if (args.dense is not None or args.sparse is not None or args.exact_small is not None
                or args.exact_budget is not None):
            raise UsageError("--exact keeps every layer unprojected: drop --dense / --sparse / --exact-small / "
                             "--exact-budget")
        return "exact"
    if args.dense is not None and args.sparse is not None:
        raise UsageError("--dense and --sparse are two projections: give one")
    if args.sparse_s is not None and args.sparse is None:
        raise UsageError("--sparse-s applies to --sparse K")
    flat = "--dense" if args.dense is not None else "--sparse" if args.sparse is not None else None
    for given, flag in ((args.exact_small, "--exact-small"), (args.exact_budget, "--exact-budget")):
        if flat and given is not None:
            raise UsageError(f"{flag} applies to the factored projection, not to {flat}")
    if args.sparse is not None:
        return {"type": "sparse", "k": args.sparse, "s": 2 if args.sparse_s is None else args.sparse_s,
                "seed": args.seed}
    if args.dense is not None:
        return {"type": "dense", "k": args.dense, "seed": args.seed, "kind": args.kind}
    budget = {} if args.exact_budget is None else {"exact_budget": args.exact_budget}
    return {"type": "factored", "k_in": args.k_in, "k_out": args.k_out, "seed": args.seed,
            "exact_small": args.exact_small is not False, **budget}


def _cmd_featurize(args: argparse.Namespace) -> int:
    from airtrace.attribute import Attributor

    task = load(args)
    if args.kfac and (args.dense is not None or args.sparse is not None):
        raise UsageError("--kfac needs the factored projection (Kronecker factors per layer), not --dense / --sparse")
    layers, bias, projection = args.layers, args.bias, None
    if args.calibration is not None:
        from airtrace.attribute.calibration import Calibration

        chosen = Calibration.load(args.calibration).attributor_kwargs()
        layers, bias, projection = chosen["layers"], chosen["bias"], chosen["projection"]
    attributor = Attributor(task.model, layers, loss_fn=task.loss_fn, exclude=args.exclude, bias=bias,
                            projection=projection or _projection(args), curvature="kfac" if args.kfac else "identity",
                            device=args.device, backend=args.backend)
    store = attributor.featurize(task.train, args.store, dtype=args.dtype, rows_per_shard=args.rows_per_shard,
                                 total=train_size(task), overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {store!r}")
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace featurize``."""
    p = sub.add_parser("featurize", help="per-example projected gradients of the training set -> a store")
    p.add_argument("store", metavar="STORE", help="store directory (resumed when incomplete)")
    add_model_options(p)
    p.add_argument("--layers", nargs="+", default=["*"], metavar="PATTERN",
                   help="fnmatch patterns of tracked layer names (default: all trainable supported layers; "
                        "'lora' for a LoRA adapter's matrices)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="layer name patterns to drop")
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True,
                   help="attribute through the biases too (default: yes)")
    p.add_argument("--k-in", type=positive_int, default=16, help="factored projection input dim (default 16)")
    p.add_argument("--k-out", type=positive_int, default=16, help="factored projection output dim (default 16)")
    p.add_argument("--exact-small", action=argparse.BooleanOptionalAction, default=None,
                   help="keep layer sides no wider than --k-in / --k-out unprojected, their exact gradient "
                        "(default: yes, factored projection)")
    p.add_argument("--exact-budget", type=non_negative_int, metavar="N", default=None,
                   help="keep layers whose whole gradient has at most N entries (d_out x d_in, bias column "
                        "included) unprojected (default 4096; 0 projects every layer)")
    p.add_argument("--dense", type=positive_int, metavar="K", help="dense (TRAK) projection to K dims instead")
    p.add_argument("--sparse", type=positive_int, metavar="K",
                   help="sparse Johnson-Lindenstrauss projection to K dims instead (O(p s) per example)")
    p.add_argument("--sparse-s", type=positive_int, metavar="S",
                   help="nonzeros per gradient coordinate of --sparse, 1..4 (default 2)")
    p.add_argument("--calibration", metavar="FILE",
                   help="the layers, bias and projection chosen by `airtrace calibrate` (replace --layers, --bias "
                        "and the projection options)")
    p.add_argument("--exact", action="store_true",
                   help="no projection at all (every layer's full gradient): the store `score --exact` needs")
    p.add_argument("--kind", default="rademacher", choices=("rademacher", "gaussian"),
                   help="dense projection entries (default rademacher)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="projection seed (default 0)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                   help="stored dtype (default bfloat16)")
    p.add_argument("--rows-per-shard", type=positive_int,
                   help="rows per shard (default 4096, fewer for wide rows: a shard stays within 128 MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--kfac", action="store_true",
                   help="also sum the K-FAC factors from the same passes and keep them beside the store, so that "
                        "`fit --method kfac/ekfac` skips its model pass (one process, a run that writes the whole store)")
    p.set_defaults(run=scaled(_cmd_featurize), parser=p)
