"""What ``featurize``, ``fit`` and ``score`` share: the ``--model`` factory options, loading its task, and running under
torchrun and ``--profile``; imports ``airtrace.attribute``, ``airtrace.distributed``, ``airtrace.profiling`` and
``airtrace.cli.args``."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import sys

from airtrace.cli.args import UsageError


def scaled(command):
    """A featurize / fit / score command run under torchrun's process group (when launched) and ``--profile``.

    Under torchrun (WORLD_SIZE > 1) the ranks split the work (gloo on CPU, NCCL
    on CUDA, each rank on ``cuda:LOCAL_RANK``); only rank 0 prints, shows
    progress and writes ``--output``. ``--profile PATH`` writes a Chrome trace
    of the command (rank r > 0 writes ``PATH`` with ``.rank<r>`` before its extension).
    """

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from airtrace import distributed, profiling

        if args.profile is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.profile))):
            raise UsageError(f"--profile {args.profile}: its folder does not exist")
        trace = args.profile
        launched_rank = int(os.environ.get("RANK", "0")) if distributed.launched() else 0
        if trace is not None and launched_rank > 0:
            stem, ext = os.path.splitext(trace)
            trace = f"{stem}.rank{launched_rank}{ext}"
        # The profiler brackets the process group's whole life, so the group's
        # worker threads are joined before the profiler collects its events.
        with profiling.profile(trace), distributed.process_group(args.device) as device:
            args.device = str(device)
            quiet = contextlib.nullcontext() if distributed.is_main() else contextlib.redirect_stdout(io.StringIO())
            if not distributed.is_main():
                args.quiet = True
                if getattr(args, "output", None) is not None:
                    args.output = None
            try:
                with quiet:
                    return command(args)
            except distributed.DistributedError as exc:  # another rank failed and printed its own error
                print(f"airtrace {args.command} (rank {distributed.rank()}): error: {exc}", file=sys.stderr)
                return 1

    return run


def load(args: argparse.Namespace):
    return load_named(args.model)


def load_named(factory: str):
    """The task of a ``package.module:function`` factory; a bad name is a usage error."""
    from airtrace.attribute import load_task

    try:
        return load_task(factory)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def train_size(task) -> int | None:
    """Examples in the training set: the factory's count, else counted when ``train`` is a list or tuple."""
    if task.train_size is not None:
        return task.train_size
    if isinstance(task.train, (list, tuple)):
        return sum(len(ids) for ids, _ in task.train)
    return None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODULE:FUNCTION",
                        help="factory returning an airtrace.Task or (model, loss_fn, train, queries)")
    parser.add_argument("--device", default="cpu", help="device for the model and the store shards (default cpu)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "cpu", "cuda", "triton"),
                        help="kernel backend (default auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--profile", metavar="PATH",
                        help="write a torch.profiler Chrome trace (named ranges per stage) to PATH")
