"""The ``airtrace`` command line: ``main`` and the parser, one module per command (plus ``args``, the shared argument
types, and ``task``, what featurize / fit / score share); the apps layer, it imports the whole library and the other
apps' commands.

Commands:

- ``airtrace env``: which kernel backends are available, and why not.
- ``airtrace selfcheck``: every kernel backend, on its own device, against the float64 reference under the error
  bound, timed.
- ``airtrace demo [--full] [--out DIR]``: SmolLM2-135M-Instruct on chatterbot Q->A pairs, attributed with
  LoGra + EK-FAC: top-3 training pairs per held-out question, and an HTML report.
- ``airtrace featurize --model M STORE``: per-example features of the training set -> a store.
- ``airtrace fit --model M STORE --out CURV``: fit the curvature (layers and projection from the store).
- ``airtrace score --model M STORE [--curvature CURV] [--queries FILE] [--order both] [--output F]``: the most
  helpful / harmful training examples per query (JSON, CSV or Parquet).
- ``airtrace score ... --exact SOLVER``: exact influence (H + λ)⁻¹ by CG / LiSSA / Arnoldi / dense.
- ``airtrace index build STORE [--curvature CURV] [--type flat|ivfpq|hnsw]``: an ANN index beside the store, for
  ``airtrace score --index TYPE`` (two-stage: candidates, then their exact scores).
- ``airtrace ensemble STORE... --models M... [--curvatures CURV...] [--weights W...]``: the scores of several
  independently trained models (one store each), averaged or weighted.
- ``airtrace calibrate --model M --labels GT --out DIR``: projection size x curvature x damping x metric chosen by
  cross-validated LDS against retrained-subset labels; featurize / fit / score take ``--calibration DIR/calibration.json``.
- ``airtrace report SCORES [--out HTML]``: the HTML report of a scores file.
- ``airtrace select MATRIX --tasks TASKS.json --budget 0.2 [--strategy random|topk|less|bids]``: a budget of training
  examples chosen from a ``--full-matrix`` score matrix, with the per-task coverage (see :mod:`airtrace.select`).
- ``airtrace unlearn STORE --model M --forget IDS.txt [--curvature CURV] [--out WEIGHTS]``: the model with the
  effect of the forget ids removed by datamodel matching, as safetensors (see :mod:`airtrace.unlearn`).
- ``airtrace profile TRACE.json``: the per-stage summary of a ``--profile`` trace.
- ``airtrace inspect STORE [--verify]``: manifest summary, optionally checking every shard.
- ``airtrace eval digits [--model mlp|logreg] [--method ...]``: LDS / LOO / mislabel / top-k removal against
  really retrained models (see :mod:`airtrace.eval.cli`).

``--model`` names a factory ``package.module:function`` (importable, the current
directory is searched too) called with the ``--model-arg KEY=VALUE`` pairs; it returns an
:class:`airtrace.Task` or a tuple ``(model, loss_fn, train, queries)`` where
``train`` / ``queries`` are re-iterables of ``(ids, batch)`` pairs and
``loss_fn(model, batch)`` returns (B,) per-example losses (see
:mod:`airtrace.attribute`). ``featurize``, ``fit`` and ``score`` also run
distributed (``torchrun --nproc-per-node N -m airtrace featurize ...``; see
:mod:`airtrace.distributed`) and take ``--profile [TRACE.json]`` (see :mod:`airtrace.profiling`).
``--quiet`` prints nothing but errors; files are written whole (atomically) with mode 0644.

Exit status: 0 on success, 2 on usage errors (bad flags, a bad ``--model``),
1 on runtime errors (a corrupt or mismatched store, bad data, a full disk, memory
that runs out), whose message is printed on one line or a few, without a traceback;
its "Fix:" names command-line flags. Under an address-space limit (``ulimit -v``) too
low to load torch the command stops with a one-line memory error before it loads
torch (:mod:`airtrace.util.preflight`).
"""

from __future__ import annotations

import argparse
import sys

from airtrace.cli import (calibrate, demo, ensemble, env, featurize, fit, index, inspect, profile, report, score, select,
                          selfcheck, unlearn)
from airtrace.cli.args import UsageError
from airtrace.ops.backends import BackendUnavailable
from airtrace.util.fix import cli_message


def build_parser() -> argparse.ArgumentParser:
    from airtrace import __version__

    parser = argparse.ArgumentParser(prog="airtrace", description="Training-data attribution engine.")
    parser.add_argument("--version", action="version", version=f"airtrace {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    env.add_parser(sub)
    selfcheck.add_parser(sub)
    demo.add_parser(sub)
    featurize.add_parser(sub)
    fit.add_parser(sub)
    score.add_parser(sub)
    index.add_parser(sub)
    ensemble.add_parser(sub)
    calibrate.add_parser(sub)
    report.add_parser(sub)
    select.add_parser(sub)
    unlearn.add_parser(sub)
    profile.add_parser(sub)

    from airtrace.eval.cli import add_parser as eval_parser

    eval_parser(sub)

    from airtrace.airrep.cli import add_parser as airrep_parser

    airrep_parser(sub)
    inspect.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        args.parser.error(str(exc))
    except (ValueError, OSError, ImportError, BackendUnavailable) as exc:
        print(f"airtrace {args.command}: error: {cli_message(exc)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and not _out_of_memory(exc):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"airtrace {args.command}: error: out of memory ({detail}). Fix: a smaller --topk, fewer queries, "
              "or a machine with more memory", file=sys.stderr)
        return 1


def _out_of_memory(exc: BaseException) -> bool:
    """A RuntimeError of an allocator that ran out (torch's CPU allocator, CUDA)."""
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()
