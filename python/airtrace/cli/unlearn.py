"""``airtrace unlearn``: remove the effect of forget ids from a trained model by datamodel matching (predict the
retrained outputs from attribution, fine-tune to match them); imports ``airtrace.unlearn``, ``airtrace.attribute``,
``airtrace.store`` and the other ``airtrace.cli`` modules."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from airtrace.cli.args import UsageError, check_output, non_negative_int, positive_float, positive_int, world_readable
from airtrace.cli.task import add_model_options, load, scaled


def read_ids(path: str) -> list[str]:
    """The ``--forget`` file: one training id per line (blank lines skipped).

    Raises:
        UsageError: naming ``--forget PATH``: unreadable, or no ids in it.
    """
    try:
        with open(path) as f:
            ids = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--forget {path}: {exc}") from None
    if not ids:
        raise UsageError(f"--forget {path}: no ids in it; list the training ids to forget, one per line")
    return ids


def load_outputs(spec: str | None, loss_fn):
    """``--outputs MODULE:FUNCTION`` (a function ``(model, batch) -> (B, C)``), default minus the task's loss."""
    from airtrace.unlearn import minus_loss

    if spec is None:
        return minus_loss(loss_fn)
    module_name, sep, attr = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr, None) if sep and module_name and attr else None
    except ImportError as exc:
        raise UsageError(f"--outputs {spec!r}: cannot import {module_name!r} ({exc})") from None
    if not callable(function):
        raise UsageError(f"--outputs {spec!r}: expected MODULE:FUNCTION naming a function (model, batch) -> (B, C)")
    return function


def fit_from_labels(path: str, task, attributor, store, *, quiet: bool):
    """``--scale-from LABELS``: the scale fitted on the ground truth of retrained subsets (the factory's queries).

    Raises:
        UsageError: naming ``--scale-from``: unreadable labels, a factory without queries, or labels of another
            training set, queries or model.
    """
    from airtrace.eval.retrain import load_ground_truth
    from airtrace.unlearn import fit_scale

    where = f"--scale-from {path}"
    if task.queries is None:
        raise UsageError(f"{where}: the --model factory returned no query batches (the labelled queries)")
    try:
        outputs, plan, _ = load_ground_truth(path)
        return fit_scale(attributor, store, task.queries, outputs, plan.masks, source=where, progress=not quiet)
    except ValueError as exc:
        raise UsageError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None


def run_request(args: argparse.Namespace, model, store, rows: list[int]) -> str:
    """What the predicted outputs are computed from (model, store, forget rows, reference set, scale, curvature,
    outputs), hashed: a checkpoint's targets are reused only for the same request."""
    import hashlib
    import json

    from airtrace.store import model_fingerprint

    def stamp(path):
        return None if path is None else [os.path.abspath(path), os.stat(path).st_mtime_ns, os.stat(path).st_size]

    record = {"model": model_fingerprint(model), "store": [os.path.abspath(args.store), len(store)], "forget": rows,
              "retain": args.retain, "seed": args.seed, "batch_size": args.batch_size, "scale": args.scale,
              "scale_from": stamp(args.scale_from), "curvature": stamp(args.curvature), "outputs": args.outputs}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _cmd_unlearn(args: argparse.Namespace) -> int:
    import torch

    from airtrace.attribute import Attributor
    from airtrace.store import Store
    from airtrace.unlearn import (DEFAULT_SCALE_WARNING, MatchConfig, checkpoint_targets, forget_rows, match_outputs,
                                  model_outputs, predict_outputs, reference_batches, save_weights)

    checkpoint = args.checkpoint or f"{args.out}.ckpt"
    check_output(args.out, "--out")
    check_output(checkpoint, "--checkpoint")
    forget_ids = read_ids(args.forget)
    try:
        config = MatchConfig(steps=args.steps, lr=args.lr, seed=args.seed, checkpoint_every=args.checkpoint_every)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    task = load(args)
    if not os.path.isdir(args.store):
        raise UsageError(f"STORE {args.store}: no such folder; write it with airtrace featurize")
    store = Store.open(args.store)
    try:
        rows = forget_rows(store.ids, forget_ids, what=f"--forget {args.forget}")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    outputs = load_outputs(args.outputs, task.loss_fn)
    attributor = Attributor.from_store(task.model, store, loss_fn=task.loss_fn, device=args.device,
                                       backend=args.backend, **({} if args.curvature else {"curvature": "identity"}))
    if args.curvature is not None:
        attributor.load_curvature(args.curvature)
    request = run_request(args, task.model, store, rows)
    resumed = checkpoint_targets(checkpoint, request)
    reference = reference_batches(task.train, store, rows, retain=args.retain, seed=args.seed,
                                  batch_size=args.batch_size)
    fitted = None
    if resumed is not None:
        targets, step = resumed
        if not args.quiet:
            print(f"resuming {checkpoint} at step {step}: the predicted outputs come from the checkpoint (the "
                  "attribution is not recomputed)")
    else:
        scale = args.scale
        if args.scale_from is not None:
            fitted = fit_from_labels(args.scale_from, task, attributor, store, quiet=args.quiet)
            scale = fitted.scale
        elif scale is None:
            scale = 1.0 / len(store)
            print(f"airtrace unlearn: warning: {DEFAULT_SCALE_WARNING}", file=sys.stderr)
        targets = predict_outputs(attributor, store, reference, rows, outputs, scale=scale, progress=not args.quiet)
    before = float(((targets.full - targets.predicted) ** 2).sum(dim=1).mean())
    match_outputs(task.model, reference, targets, outputs, config, checkpoint=checkpoint, request=request,
                  progress=not args.quiet)
    after = float(((model_outputs(task.model, reference, outputs) - targets.predicted) ** 2).sum(dim=1).mean())
    scale_source = ("fitted on " + args.scale_from if args.scale_from else "given" if args.scale is not None
                    else "1/n (not fitted)")
    save_weights(task.model, args.out, metadata={"forget_ids": str(len(rows)), "method": "datamodel matching",
                                                 "scale": repr(targets.scale), "scale_source": scale_source,
                                                 "steps": str(config.steps)})
    world_readable(args.out)
    if not args.quiet:
        shift = (targets.full - targets.predicted).abs().mean(dim=1)
        forgotten = {str(store.ids[r]) for r in rows}
        on_forget = torch.tensor([str(i) in forgotten for i in targets.ids])
        print(f"forget {len(rows)} of {len(store)} training examples; reference set {len(targets.ids)} "
              f"({len(rows)} forget + {len(targets.ids) - len(rows)} retained)")
        print(f"scale {targets.scale:.4g} = {targets.scale * len(store):.4g} / n, {scale_source}"
              + (f" (correlation {fitted.correlation:.3f} of predicted and measured changes over {fitted.subsets} "
                 f"retrained subsets x {fitted.queries} queries)" if fitted else ""))
        print(f"predicted output shift, mean |Δ|: forget {float(shift[on_forget].mean()):.4g}, "
              f"retained {float(shift[~on_forget].mean()):.4g}")
        print(f"matching distance (mean squared, reference set): {before:.4g} before, {after:.4g} after "
              f"{config.steps} steps")
        print(f"wrote {args.out}")
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace unlearn``."""
    p = sub.add_parser("unlearn", help="remove the effect of training examples from the model by datamodel matching "
                                       "and write the unlearned weights (safetensors)")
    p.add_argument("store", metavar="STORE", help="the training set's store (airtrace featurize)")
    add_model_options(p)
    p.add_argument("--forget", required=True, metavar="IDS.txt", help="training ids to forget, one per line")
    p.add_argument("--curvature", metavar="CURV", help="fitted curvature (airtrace fit; default: identity)")
    p.add_argument("--out", default="unlearned.safetensors", metavar="WEIGHTS",
                   help="the unlearned model's state dict (default unlearned.safetensors)")
    p.add_argument("--outputs", metavar="MODULE:FUNCTION",
                   help="the outputs to match, a function (model, batch) -> (B, C), e.g. logits "
                        "(default: minus the task's per-example loss)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--scale-from", metavar="LABELS",
                       help="fit the factor on the summed attribution scores on datamodel labels: models retrained "
                            "on random subsets of this training set, measured on the factory's queries as minus "
                            "its per-example loss (the ground truth of airtrace.eval.retrain that airtrace "
                            "calibrate reads)")
    scale.add_argument("--scale", type=positive_float,
                       help="the factor on the summed attribution scores (default, with a warning: 1 / training "
                            "examples, the one-step Newton estimate of removing them from a mean loss, an "
                            "overestimate for a model not trained to its optimum; prefer --scale-from)")
    p.add_argument("--retain", type=positive_int, default=512,
                   help="retained examples drawn into the reference set beside the forget set (default 512)")
    p.add_argument("--steps", type=positive_int, default=100, help="fine-tuning steps (default 100)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="reference examples per step (default 64)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the retained sample and the batch order")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="checkpoint written during fine-tuning; a run started again resumes from it "
                        "(default WEIGHTS.ckpt; removed at the end)")
    p.add_argument("--checkpoint-every", type=positive_int, default=10, help="steps between checkpoints (default 10)")
    p.set_defaults(run=scaled(_cmd_unlearn), parser=p)
