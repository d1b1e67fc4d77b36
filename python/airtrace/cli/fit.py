"""``airtrace fit``: fit the curvature (layers and projection from the store); imports ``airtrace.attribute``,
``airtrace.curvature`` and the other ``airtrace.cli`` modules."""

from __future__ import annotations

import argparse

from airtrace.cli.args import UsageError, bounded, check_output, positive_float, positive_int, world_readable
from airtrace.cli.task import add_model_options, load, scaled, train_size

_positive_or_auto = bounded(float, 0.0, "a finite positive number or 'auto'")


def damping_value(text: str):
    """``--damping``: "auto" or a finite positive number (absolute λ)."""
    return "auto" if text == "auto" else _positive_or_auto(text)


def _damping(args: argparse.Namespace):
    from airtrace.curvature import Damping

    if args.damping_factor is not None:
        return Damping(factor=args.damping_factor)
    return "auto" if args.damping in (None, "auto") else Damping(value=args.damping)


def _cmd_fit(args: argparse.Namespace) -> int:
    from airtrace.attribute import Attributor

    check_output(args.out, "--out")
    task = load(args)
    method, damping = args.method or "ekfac", _damping(args)
    if args.calibration is not None:
        from airtrace.attribute.calibration import Calibration

        if args.method is not None or args.damping is not None or args.damping_factor is not None:
            raise UsageError("--calibration sets the curvature and damping: drop --method / --damping / "
                             "--damping-factor")
        chosen = Calibration.load(args.calibration).attributor_kwargs()
        method, damping = chosen["curvature"], chosen["damping"]
    attributor = Attributor.from_store(task.model, args.store, loss_fn=task.loss_fn, curvature=method,
                                       damping=damping, rank=args.rank, device=args.device, backend=args.backend)
    curvature = attributor.fit(task.train, args.out, store=args.store, total=train_size(task),
                               progress=not args.quiet)
    world_readable(args.out)
    if not args.quiet:
        print(f"fitted {curvature.method} on {curvature.n_examples} examples -> {args.out}")
        rule = curvature.damping_rule or {}
        criterion = rule.get("criterion") or {}
        for layer, lam in curvature.damping.items():
            extra = f" (rule {rule['rule']}, criterion ρ = {criterion[layer]:.4g})" if layer in criterion else ""
            print(f"  {layer}: damping {lam:.4g}{extra}")
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace fit``."""
    p = sub.add_parser("fit", help="fit the curvature on the training set (layers and projection from STORE)")
    p.add_argument("store", metavar="STORE", help="store written by featurize")
    add_model_options(p)
    p.add_argument("--out", required=True, metavar="CURV", help="output safetensors file of the factors")
    p.add_argument("--method", choices=("ekfac", "kfac", "fisher", "lowrank", "identity"),
                   help="curvature (default ekfac)")
    damping = p.add_mutually_exclusive_group()
    damping.add_argument("--damping", type=damping_value, metavar="LAMBDA|auto",
                         help="absolute damping λ, or 'auto' (default): a factor per layer chosen from the training "
                              "features (airtrace.curvature.damping; the criterion is printed and saved)")
    damping.add_argument("--damping-factor", type=positive_float,
                         help="λ = factor × mean eigenvalue per layer (the fixed rule: ekfac/kfac 0.1, "
                              "fisher/lowrank 1.0)")
    p.add_argument("--calibration", metavar="FILE",
                   help="the curvature and damping chosen by `airtrace calibrate` (replace --method / --damping)")
    p.add_argument("--rank", type=positive_int, default=32, help="eigenpairs per layer for lowrank (default 32)")
    p.set_defaults(run=scaled(_cmd_fit), parser=p)
