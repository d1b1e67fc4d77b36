"""The ``airtrace`` command line.

Commands:

- ``airtrace env``: which kernel backends are available, and why not.
- ``airtrace selfcheck``: every kernel backend against the float64 reference, timed.
- ``airtrace demo [--full] [--out DIR]``: SmolLM2-135M-Instruct on chatterbot Q->A pairs, attributed with
  LoGra + EK-FAC: top-3 training pairs per held-out question, and an HTML report.
- ``airtrace featurize --model M STORE``: per-example features of the training set -> a store.
- ``airtrace fit --model M STORE --out CURV``: fit the curvature (layers and projection from the store).
- ``airtrace score --model M STORE [--curvature CURV]``: top-k training examples per query.
- ``airtrace inspect STORE [--verify]``: manifest summary, optionally checking every shard.
- ``airtrace eval digits [--model mlp|logreg] [--method ...]``: LDS / LOO / mislabel / top-k removal against
  really retrained models (see :mod:`airtrace.eval.cli`).

``--model`` names a factory ``package.module:function`` (importable, the current
directory is searched too) called without arguments; it returns an
:class:`airtrace.Task` or a tuple ``(model, loss_fn, train, queries)`` where
``train`` / ``queries`` are re-iterables of ``(ids, batch)`` pairs and
``loss_fn(model, batch)`` returns (B,) per-example losses (see
:mod:`airtrace.attribute`). ``featurize``, ``fit`` and ``score`` also run
distributed (``torchrun --nproc-per-node N -m airtrace featurize ...``; see
:mod:`airtrace.distributed`) and take ``--profile TRACE.json`` (see :mod:`airtrace.profiling`).

Exit status: 0 on success, 2 on usage errors (bad flags, a bad ``--model``),
1 on runtime errors (a corrupt or mismatched store, bad data), whose message
is printed without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import sys

from airtrace._dispatch import BackendUnavailable


class UsageError(Exception):
    """A bad command line discovered after parsing (e.g. an unusable ``--model``)."""


def _bounded(parse, lowest, description: str, highest=float("inf")):
    """An argparse type: ``parse(text)`` with ``lowest < value < highest`` (finite), else a usage error."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not lowest < value < highest:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text}")
        return value

    return convert


_positive_int = _bounded(int, 0, "a positive integer")
_non_negative_int = _bounded(int, -1, "a non-negative integer")
_positive_float = _bounded(float, 0.0, "a finite positive number")
_fraction = _bounded(float, 0.0, "a number in (0, 1)", 1.0)


# --------------------------------------------------------------------------- env, selfcheck


def _cmd_env(args: argparse.Namespace) -> int:
    from airtrace.env import report

    print(report())
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from airtrace import selfcheck
    from airtrace.env import report

    print(report())
    print()
    rows = selfcheck.run(scale=args.scale, repeats=args.repeats, progress=lambda m: print(m, file=sys.stderr))
    print(selfcheck.format_rows(rows))
    ok = selfcheck.all_passed(rows)
    print(f"\nself-check: {'all backends match the float64 reference' if ok else 'MISMATCH against the float64 reference'}")
    return 0 if ok else 1


# --------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    from airtrace.demo import run

    start = time.perf_counter()
    result = run.run(args.out, n_train=None if args.full else args.train, metric=args.metric,
                     cache_dir=args.cache_dir, progress=not args.quiet, log=lambda line: print(line, file=sys.stderr))
    print()
    print(run.format_top(result))
    print(f"report: {result.report.resolve()}")
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    return 0


def _demo_parser(sub) -> None:
    from airtrace.demo.run import DEFAULT_TRAIN

    p = sub.add_parser("demo", help="attribute held-out chatterbot questions to SmolLM2's training pairs "
                                    "(LoGra + EK-FAC), print the top-3 and write an HTML report")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--train", type=_positive_int, default=DEFAULT_TRAIN,
                      help=f"training pairs (default {DEFAULT_TRAIN}, a few minutes on 2 CPU cores)")
    size.add_argument("--full", action="store_true", help="use every training pair of the corpus")
    p.add_argument("--out", default="airtrace-demo", metavar="DIR",
                   help="folder for the store, curvature and report.html (default ./airtrace-demo)")
    p.add_argument("--metric", default="relative", choices=("relative", "inner", "cosine"),
                   help="score: relative influence (default), influence (inner) or cosine")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="model cache (default $AIRTRACE_CACHE/smollm2 or ~/.cache/airtrace/smollm2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_demo, parser=p)


# --------------------------------------------------------------------------- featurize, fit, score


def _scaled(command):
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


def _task(args: argparse.Namespace):
    from airtrace.attribute import load_task

    try:
        return load_task(args.model)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _train_size(task) -> int | None:
    """Examples in the training set: the factory's count, else counted when ``train`` is a list or tuple."""
    if task.train_size is not None:
        return task.train_size
    if isinstance(task.train, (list, tuple)):
        return sum(len(ids) for ids, _ in task.train)
    return None


def _projection(args: argparse.Namespace) -> dict:
    if args.dense is not None:
        if args.exact_small:
            raise UsageError("--exact-small applies to the factored projection, not to --dense")
        return {"type": "dense", "k": args.dense, "seed": args.seed, "kind": args.kind}
    return {"type": "factored", "k_in": args.k_in, "k_out": args.k_out, "seed": args.seed,
            "exact_small": args.exact_small}


def _cmd_featurize(args: argparse.Namespace) -> int:
    from airtrace.attribute import Attributor

    task = _task(args)
    if args.kfac and args.dense is not None:
        raise UsageError("--kfac needs the factored projection (Kronecker factors per layer), not --dense")
    attributor = Attributor(task.model, args.layers, loss_fn=task.loss_fn, exclude=args.exclude, bias=args.bias,
                            projection=_projection(args), curvature="kfac" if args.kfac else "identity",
                            device=args.device, backend=args.backend)
    store = attributor.featurize(task.train, args.store, dtype=args.dtype, rows_per_shard=args.rows_per_shard,
                                 total=_train_size(task), overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {store!r}")
    return 0


def _damping(args: argparse.Namespace):
    from airtrace.curvature import Damping

    if args.damping is not None:
        return Damping(value=args.damping)
    return Damping(factor=args.damping_factor)


def _cmd_fit(args: argparse.Namespace) -> int:
    from airtrace.attribute import Attributor

    task = _task(args)
    attributor = Attributor.from_store(task.model, args.store, loss_fn=task.loss_fn, curvature=args.method,
                                       damping=_damping(args), rank=args.rank, device=args.device,
                                       backend=args.backend)
    curvature = attributor.fit(task.train, args.out, store=args.store, total=_train_size(task),
                               progress=not args.quiet)
    print(f"fitted {curvature.method} on {curvature.n_examples} examples -> {args.out}")
    for layer, lam in curvature.damping.items():
        print(f"  {layer}: damping {lam:.4g}")
    return 0


def _read_groups(path: str | None) -> list | None:
    if path is None:
        return None
    with open(path) as f:
        groups = json.load(f)
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise ValueError(f"{path}: --groups must be a JSON list of lists of train row indices")
    return groups


def _cmd_score(args: argparse.Namespace) -> int:
    from airtrace.attribute import Attributor

    task = _task(args)
    if task.queries is None:
        raise UsageError(f"--model {args.model!r}: the factory returned no query batches to score")
    attributor = Attributor.from_store(task.model, args.store, loss_fn=task.loss_fn, curvature="identity",
                                       device=args.device, backend=args.backend)
    if args.curvature is not None:
        attributor.load_curvature(args.curvature)
    scores = attributor.score(task.queries, args.store, topk=args.topk, metric=args.metric,
                              full_matrix_path=args.full_matrix, groups=_read_groups(args.groups),
                              progress=not args.quiet)
    rows = scores.to_rows()
    print("query_id\trank\ttrain_id\tscore")
    for row in rows:
        print(f"{row['query_id']}\t{row['rank']}\t{row['train_id']}\t{row['score']:.6g}")
    if args.output is not None:
        result = {"metric": scores.metric, "curvature": attributor.curvature.method, "query_ids": scores.query_ids,
                  "topk": rows, "groups": None if scores.groups is None else scores.groups.tolist()}
        from airtrace.store import atomic_write

        atomic_write(os.path.abspath(args.output), [json.dumps(result, indent=1).encode()])  # all or nothing
        print(f"wrote {args.output}")
    return 0


# --------------------------------------------------------------------------- inspect


def store_summary(store) -> str:
    """Human-readable manifest summary of a :class:`airtrace.store.Store`.

    The layer list of the projection record is shown with the layout (kind and
    d_out x d_in per block), not repeated under meta.
    """
    meta = json.loads(json.dumps(store.meta))
    projection = meta.get("projection") if isinstance(meta.get("projection"), dict) else {}
    specs = {spec.get("name"): spec for spec in projection.pop("layers", []) if isinstance(spec, dict)}
    sidecars = sorted(n for n in os.listdir(store.path) if n.startswith("sidecar-"))
    lines = [
        f"store        {store.path}",
        f"complete     {'yes' if store.complete else 'no (writer not closed; resume it)'}",
        f"rows         {len(store)} in {len(store.shards)} shards ({store.rows_per_shard} rows per shard)",
        f"dtype        {store.manifest['dtype']}",
        f"width        {store.width}",
        f"fingerprint  {store.fingerprint}",
        f"layout       {len(store.layout)} blocks",
        *(f"  {b.name}  {list(b.shape)}  {b.width}{_layer_text(specs.get(b.name))}" for b in store.layout),
        f"extras       {', '.join(store.extras) or 'none'}",
        f"sidecars     {', '.join(sidecars) or 'none'}",
        "meta         " + json.dumps(meta, indent=2, sort_keys=True).replace("\n", "\n             "),
    ]
    return "\n".join(lines)


def _layer_text(spec: dict | None) -> str:
    if spec is None:
        return ""
    return f"  ({spec.get('kind')} {spec.get('d_out')}x{spec.get('d_in')}{' +bias' if spec.get('bias') else ''})"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from airtrace.store import Store

    store = Store.open(args.store, allow_incomplete=True)
    print(store_summary(store))
    if args.verify:
        store.verify()
        print(f"verified     {len(store.shards)} shards: headers, sizes, sha256 and ids match the manifest")
    return 0


# --------------------------------------------------------------------------- parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODULE:FUNCTION",
                        help="factory returning an airtrace.Task or (model, loss_fn, train, queries)")
    parser.add_argument("--device", default="cpu", help="device for the model and the store shards (default cpu)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "cpu", "cuda", "triton"),
                        help="kernel backend (default auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--profile", metavar="PATH",
                        help="write a torch.profiler Chrome trace (named ranges per stage) to PATH")


def _featurize_parser(sub) -> None:
    p = sub.add_parser("featurize", help="per-example projected gradients of the training set -> a store")
    p.add_argument("store", metavar="STORE", help="store directory (resumed when incomplete)")
    _add_model_options(p)
    p.add_argument("--layers", nargs="+", default=["*"], metavar="PATTERN",
                   help="fnmatch patterns of tracked layer names (default: all supported layers)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="layer name patterns to drop")
    p.add_argument("--bias", action="store_true", help="attribute through biases too")
    p.add_argument("--k-in", type=_positive_int, default=16, help="factored projection input dim (default 16)")
    p.add_argument("--k-out", type=_positive_int, default=16, help="factored projection output dim (default 16)")
    p.add_argument("--exact-small", action="store_true",
                   help="keep layer sides no wider than --k-in / --k-out unprojected (exact gradient there)")
    p.add_argument("--dense", type=_positive_int, metavar="K", help="dense (TRAK) projection to K dims instead")
    p.add_argument("--kind", default="rademacher", choices=("rademacher", "gaussian"),
                   help="dense projection entries (default rademacher)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="projection seed (default 0)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                   help="stored dtype (default bfloat16)")
    p.add_argument("--rows-per-shard", type=_positive_int,
                   help="rows per shard (default 4096, fewer for wide rows: a shard stays within 128 MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--kfac", action="store_true",
                   help="also sum the K-FAC factors from the same passes and keep them beside the store, so that "
                        "`fit --method kfac/ekfac` skips its model pass (one process, a run that writes the whole store)")
    p.set_defaults(run=_scaled(_cmd_featurize), parser=p)


def _fit_parser(sub) -> None:
    p = sub.add_parser("fit", help="fit the curvature on the training set (layers and projection from STORE)")
    p.add_argument("store", metavar="STORE", help="store written by featurize")
    _add_model_options(p)
    p.add_argument("--out", required=True, metavar="CURV", help="output safetensors file of the factors")
    p.add_argument("--method", default="ekfac", choices=("ekfac", "kfac", "fisher", "lowrank", "identity"),
                   help="curvature (default ekfac)")
    damping = p.add_mutually_exclusive_group()
    damping.add_argument("--damping", type=_positive_float, help="absolute damping λ")
    damping.add_argument("--damping-factor", type=_positive_float, default=0.1,
                         help="λ = factor × mean eigenvalue per layer (default 0.1)")
    p.add_argument("--rank", type=_positive_int, default=32, help="eigenpairs per layer for lowrank (default 32)")
    p.set_defaults(run=_scaled(_cmd_fit), parser=p)


def _score_parser(sub) -> None:
    p = sub.add_parser("score", help="top-k training examples per query, streamed over STORE")
    p.add_argument("store", metavar="STORE", help="store written by featurize")
    _add_model_options(p)
    p.add_argument("--curvature", metavar="CURV", help="factors written by fit (default: identity)")
    p.add_argument("--topk", type=_positive_int, default=10, help="results per query (default 10)")
    p.add_argument("--metric", default="inner", choices=("inner", "cosine", "relative"),
                   help="score (default inner)")
    p.add_argument("--full-matrix", metavar="PATH", help="also write the (q, n) score matrix (safetensors)")
    p.add_argument("--groups", metavar="JSON", help="JSON list of lists of train row indices: group sums")
    p.add_argument("--output", metavar="JSON", help="write the results as JSON")
    p.set_defaults(run=_scaled(_cmd_score), parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airtrace", description="Training-data attribution engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    env = sub.add_parser("env", help="show which kernel backends are available and why not")
    env.set_defaults(run=_cmd_env, parser=env)

    check = sub.add_parser("selfcheck", help="check every kernel backend against the float64 reference and time it")
    check.add_argument("--scale", type=_positive_int, default=1, help="problem size multiplier (default 1)")
    check.add_argument("--repeats", type=_positive_int, default=3, help="timing repeats per backend (default 3)")
    check.set_defaults(run=_cmd_selfcheck, parser=check)

    _demo_parser(sub)

    _featurize_parser(sub)
    _fit_parser(sub)
    _score_parser(sub)

    from airtrace.eval.cli import add_parser as eval_parser

    eval_parser(sub)

    from airtrace.airrep.cli import add_parser as airrep_parser

    airrep_parser(sub)

    inspect = sub.add_parser("inspect", help="summarise a store's manifest; --verify checks every shard")
    inspect.add_argument("store", metavar="STORE", help="store directory")
    inspect.add_argument("--verify", action="store_true", help="check every shard's header, size and sha256")
    inspect.set_defaults(run=_cmd_inspect, parser=inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        args.parser.error(str(exc))
    except (ValueError, OSError, BackendUnavailable) as exc:
        print(f"airtrace {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
