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

from airtrace.cli.args import UsageError, check_output, key_value


def scaled(command):
    """A featurize / fit / score command run under torchrun's process group (when launched) and ``--profile``.

    Under torchrun (WORLD_SIZE > 1) the ranks split the work (gloo on CPU, NCCL
    on CUDA, each rank on ``cuda:LOCAL_RANK``); only rank 0 prints, shows
    progress and writes ``--output``. ``--profile`` prints a per-stage summary
    table (seconds, share, rows/s, MB/s, peak memory) to stderr after the run;
    ``--profile PATH`` also writes a Chrome trace of the command with the summary
    in it (rank r > 0 writes ``PATH`` with ``.rank<r>`` before its extension).
    """

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from airtrace import distributed, profiling

        check_output(args.profile or None, "--profile")
        trace = args.profile or None
        launched_rank = int(os.environ.get("RANK", "0")) if distributed.launched() else 0
        if trace is not None and launched_rank > 0:
            stem, ext = os.path.splitext(trace)
            trace = f"{stem}.rank{launched_rank}{ext}"
        # The profiler brackets the process group's whole life, so the group's
        # worker threads are joined before the profiler collects its events.
        with profiling.profile(trace), profiling.collect(args.profile is not None) as summary:
            with distributed.process_group(args.device) as device:
                args.device = str(device)
                main = distributed.is_main()
                quiet = contextlib.nullcontext() if main else contextlib.redirect_stdout(io.StringIO())
                if not main:
                    args.quiet = True
                    if getattr(args, "output", None) is not None:
                        args.output = None
                try:
                    with quiet:
                        status = command(args)
                except distributed.DistributedError as exc:  # another rank failed and printed its own error
                    print(f"airtrace {args.command} (rank {distributed.rank()}): error: {exc}", file=sys.stderr)
                    return 1
        if args.profile is not None:
            if trace is not None:
                profiling.attach_summary(trace, summary)
            if launched_rank == 0:
                print(f"\nairtrace {args.command}: time per stage\n{profiling.format_summary(summary)}", file=sys.stderr)
        return status

    return run


def load(args: argparse.Namespace):
    return load_named(args.model, dict(args.model_arg))


def load_named(factory: str, model_args: dict | None = None):
    """The task of a ``package.module:function`` factory called with ``model_args``; a bad name is a usage error."""
    from airtrace.attribute import load_task

    try:
        return load_task(factory, model_args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def train_size(task) -> int | None:
    """Examples in the training set: the factory's count, else the length of its list, DataLoader or dataset."""
    from airtrace.attribute.batches import example_count

    return task.train_size if task.train_size is not None else example_count(task.train)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODULE:FUNCTION",
                        help="factory returning an airtrace.Task or (model, loss_fn, train, queries)")
    parser.add_argument("--model-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for the factory (repeatable; VALUE is JSON when it parses, else text)")
    parser.add_argument("--device", default="cpu", help="device for the model and the store shards (default cpu)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "cpu", "cuda", "triton"),
                        help="kernel backend (default auto)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors (no progress bars)")
    parser.add_argument("--profile", nargs="?", const="", metavar="TRACE.json",
                        help="print a per-stage summary (seconds, share, rows/s, MB/s, peak memory) after the run; "
                             "with a path, also write a torch.profiler Chrome trace there (airtrace profile reads it)")
