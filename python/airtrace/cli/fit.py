"""``airtrace fit``: fit the curvature (layers and projection from the store); imports ``airtrace.attribute``,
``airtrace.curvature`` and the other ``airtrace.cli`` modules."""

from __future__ import annotations

import argparse

from airtrace.cli.args import check_output, positive_float, positive_int, world_readable
from airtrace.cli.task import add_model_options, load, scaled, train_size


def _damping(args: argparse.Namespace):
    from airtrace.curvature import Damping

    if args.damping is not None:
        return Damping(value=args.damping)
    return Damping(factor=args.damping_factor)


def _cmd_fit(args: argparse.Namespace) -> int:
    from airtrace.attribute import Attributor

    check_output(args.out, "--out")
    task = load(args)
    attributor = Attributor.from_store(task.model, args.store, loss_fn=task.loss_fn, curvature=args.method,
                                       damping=_damping(args), rank=args.rank, device=args.device,
                                       backend=args.backend)
    curvature = attributor.fit(task.train, args.out, store=args.store, total=train_size(task),
                               progress=not args.quiet)
    world_readable(args.out)
    if not args.quiet:
        print(f"fitted {curvature.method} on {curvature.n_examples} examples -> {args.out}")
        for layer, lam in curvature.damping.items():
            print(f"  {layer}: damping {lam:.4g}")
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace fit``."""
    p = sub.add_parser("fit", help="fit the curvature on the training set (layers and projection from STORE)")
    p.add_argument("store", metavar="STORE", help="store written by featurize")
    add_model_options(p)
    p.add_argument("--out", required=True, metavar="CURV", help="output safetensors file of the factors")
    p.add_argument("--method", default="ekfac", choices=("ekfac", "kfac", "fisher", "lowrank", "identity"),
                   help="curvature (default ekfac)")
    damping = p.add_mutually_exclusive_group()
    damping.add_argument("--damping", type=positive_float, help="absolute damping λ")
    damping.add_argument("--damping-factor", type=positive_float, default=0.1,
                         help="λ = factor × mean eigenvalue per layer (default 0.1)")
    p.add_argument("--rank", type=positive_int, default=32, help="eigenpairs per layer for lowrank (default 32)")
    p.set_defaults(run=scaled(_cmd_fit), parser=p)
