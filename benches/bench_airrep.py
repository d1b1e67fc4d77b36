#!/usr/bin/env python
"""AirRep vs gradient attribution on the chatterbot causal LM: LDS, inference cost, store size.

Ground truth: models of :mod:`airtrace.eval.tasks.lm` retrained on random 50%
subsets of the training pool (:mod:`airtrace.airrep.labels`, cached under
``$AIRTRACE_CACHE/airrep``). The first ``subsets - holdout`` subset models give
the labels of the *dev* pairs the encoder is trained on; the last ``holdout``
subset models and the task's *query* pairs (never seen in encoder training) are
the evaluation: LDS = mean over queries of Spearman(predicted subset value,
minus the query's retrained loss) over the held-out subsets.

Methods, all scored on the same held-out subsets and queries:

- ``airrep``: encoder trained with attention pooling, scored with attention pooling;
- ``airrep/sum-inference``: the same encoder, scored with plain sum pooling;
- ``airrep-sum``: an encoder trained and scored with sum pooling;
- ``minilm-untrained`` / ``minilm-untrained/sum``: the base encoder (MiniLM-L6 + its seeded random
  projector, the starting point of training), attention / sum pooling;
- ``logra+identity`` / ``logra+ekfac``: airtrace's Attributor (factored k x k projection
  of every layer, biases included) on the LM trained on the full pool, additive group scores.

Paired differences of per-query LDS (AirRep minus the others, bootstrap over the queries)
are printed after the table.

Inference cost per example: wall time of featurizing the training pool (embedding: the
backbone + projector forward; gradient: forward + backward + projection) divided by
its size, in the same process. On the 1-layer tiny LM a gradient is far cheaper than a
MiniLM forward, so the cost comparison that means something is against a real target:
the ``cost:`` rows time, on the same ``--cost-pairs`` pool pairs, in the same process and
threads, LoGra k x k featurization of SmolLM2-135M-Instruct as in ``airtrace demo``
(last six decoder layers, backward stopped there) and the MiniLM-L6 embedding (medians
of 3 interleaved timings after one untimed warm-up batch); they have no LDS. Store size:
bytes of one example's row (float32). Projector training (``train_seconds``) runs on one
thread.

Defaults (512 subsets, 128 held out, :class:`airtrace.airrep.train.TrainConfig` defaults)
were chosen on validation splits carved from the training subsets and dev pairs (e.g.
subsets 0-143 x 80% of the dev pairs, scored on subsets 144-191 x the other 20%; and
0-287 against 288-383), never on the held-out subsets or the queries. Label generation
costs about 1 s per subset model on one core (512 models: 10 minutes).

    python benches/bench_airrep.py --quick      # smoke pass (few subsets, few steps, no SmolLM2), writes nothing
    python benches/bench_airrep.py              # -> benches/results/<device>/airrep.csv

Targets: none (the LDS and cost figures are reported, not judged); ``--check`` is accepted like
in every bench.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from airtrace.airrep.encoder import Encoder, pair_texts  # noqa: E402
from airtrace.airrep.evaluate import airrep_lds  # noqa: E402
from airtrace.airrep.labels import LabelConfig, generate  # noqa: E402
from airtrace.airrep.train import TrainConfig, train  # noqa: E402
from airtrace.attribute import Attributor  # noqa: E402
from airtrace.eval import metrics  # noqa: E402

COLUMNS = ("method", "lds", "ci_lo", "ci_hi", "ms_per_example", "bytes_per_example", "method_seconds",
           "train_seconds", "note")
F64 = torch.float64


def gradient_rows(labels, eval_masks, eval_outputs, k: int, progress: bool) -> list[dict]:
    """LoGra + identity and + EK-FAC on the LM trained on the whole pool."""
    task = labels.task
    n = len(task.train)
    model = task.train_fn(torch.arange(n), task.config.seed)
    train_batches, query_batches = task.train_batches(), task.query_batches()  # ids = rows of train / queries
    rows = []
    for curvature in ("identity", "ekfac"):
        attributor = Attributor(model, "*", loss_fn=task.loss_fn, bias=True, curvature=curvature,
                                projection={"type": "factored", "k_in": k, "k_out": k, "seed": 0,
                                            "exact_small": False})
        with tempfile.TemporaryDirectory(prefix="bench-airrep-") as tmp:
            start = time.perf_counter()
            store = attributor.featurize(train_batches, os.path.join(tmp, "store"), dtype="float32", total=n,
                                         progress=progress)
            featurize = time.perf_counter() - start
            attributor.fit(train_batches, store=store, total=n, progress=progress)
            path = os.path.join(tmp, "scores.safetensors")
            result = attributor.score(query_batches, store, topk=1, full_matrix_path=path, progress=progress)
            seconds = time.perf_counter() - start
            with safe_open(path, framework="pt") as f:
                stored = f.get_tensor("scores").to(F64)
            columns = torch.tensor([int(i) for i in store.ids])
        scores = torch.zeros_like(stored)
        scores[torch.tensor([int(i) for i in result.query_ids])[:, None], columns[None, :]] = stored
        result = metrics.lds(scores, eval_masks, eval_outputs)
        rows.append({"method": f"logra{k}+{curvature}", "lds": result.mean, "ci_lo": result.ci[0],
                     "ci_hi": result.ci[1], "per_query": result.per_query, "ms_per_example": 1e3 * featurize / n,
                     "bytes_per_example": 4 * attributor.width, "method_seconds": seconds, "train_seconds": 0.0,
                     "note": f"{len(attributor.layers)} layers, width {attributor.width}"})
    return rows


def inference_cost_rows(pairs, base: Encoder, k: int, progress: bool, repeats: int = 3) -> list[dict]:
    """Per-example featurization cost on ``pairs``: SmolLM2-135M LoGra k x k (as in the demo) vs MiniLM embedding.

    Medians of ``repeats`` interleaved timings of each, after one untimed warm-up batch.
    """
    from airtrace import data
    from airtrace.demo import run as demo
    from airtrace.demo.models import load_smollm2

    model, tokenizer = load_smollm2(log=lambda line: print(f"# {line}"))
    projection = {**demo.PROJECTION, "k_in": k, "k_out": k}
    attributor = Attributor(model, demo.LAYERS, loss_fn=demo.loss_fn, projection=projection)

    def batches(chunk):
        return data.batches(chunk, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                            batch_size=demo.BATCH_SIZE, max_length=demo.MAX_LENGTH, pad_id=tokenizer.pad_token_id)

    warm = pairs[: demo.BATCH_SIZE]
    gradient, embed = [], []
    with tempfile.TemporaryDirectory(prefix="bench-airrep-") as tmp:
        attributor.featurize(batches(warm), os.path.join(tmp, "warm"), dtype="float32", progress=False)
        base.embed(pair_texts(warm))
        for r in range(repeats):                # interleaved, so that both see the same machine load
            start = time.perf_counter()         # both timings include tokenization
            attributor.featurize(batches(pairs), os.path.join(tmp, f"store{r}"), dtype="float32",
                                 total=len(pairs), progress=progress)
            gradient.append(time.perf_counter() - start)
            start = time.perf_counter()
            embeddings = base.embed(pair_texts(pairs), progress=progress, desc="embed: cost pairs")
            embed.append(time.perf_counter() - start)
    gradient, embed = statistics.median(gradient), statistics.median(embed)
    n = len(pairs)
    return [
        {"method": f"cost:smollm2-135m/logra{k}", "ms_per_example": 1e3 * gradient / n,
         "bytes_per_example": 4 * attributor.width, "method_seconds": gradient,
         "note": f"{n} pool pairs, median of {repeats}; {len(attributor.layers)} layers as in airtrace demo"},
        {"method": "cost:minilm-l6/embed", "ms_per_example": 1e3 * embed / n,
         "bytes_per_example": 4 * embeddings.shape[1], "method_seconds": embed,
         "note": f"same {n} pairs; {gradient / embed:.3g}x cheaper than cost:smollm2-135m/logra{k}"},
    ]


def airrep_row(method, queries, pool, eval_masks, eval_outputs, pooling, per_example_ms, seconds, train_seconds,
               note) -> dict:
    result = airrep_lds(queries, pool, eval_masks, eval_outputs, pooling=pooling)
    return {"method": method, "lds": result.mean, "ci_lo": result.ci[0], "ci_hi": result.ci[1],
            "per_query": result.per_query, "ms_per_example": per_example_ms, "bytes_per_example": 4 * pool.shape[1],
            "method_seconds": seconds, "train_seconds": train_seconds, "note": note}


def main(argv=None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke pass: 6 subsets, 20 steps, no SmolLM2 cost rows, writes nothing")
    parser.add_argument("--size", default="tiny", choices=("tiny", "default", "large"), help="LM size (default tiny)")
    parser.add_argument("--subsets", type=int, default=512, help="subset models (default 512)")
    parser.add_argument("--holdout", type=int, default=128, help="subset models held out for LDS (default 128)")
    parser.add_argument("--dev", type=int, help="most dev pairs for encoder training (default: all)")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"encoder training steps (default {defaults.steps})")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help=f"encoder learning rate (default {defaults.lr:g})")
    parser.add_argument("--k", type=int, default=16, help="LoGra k_in = k_out (default 16)")
    parser.add_argument("--cost-pairs", type=int, default=64,
                        help="pool pairs timed for the SmolLM2 vs MiniLM cost rows (default 64; 0 skips them)")
    parser.add_argument("--out", type=Path, help="folder for airrep.csv (default benches/results/<device>/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    C.add_check_flag(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.subsets, args.holdout, args.steps, args.cost_pairs = 6, 3, 20, 0
    if not 1 <= args.holdout <= args.subsets - 2:
        parser.error(f"--holdout must be in [1, subsets - 2 = {args.subsets - 2}], got {args.holdout}")
    progress = not args.quiet
    head = C.header(gpu=False)
    C.print_header(head, "airtrace bench_airrep" + (" --quick" if args.quick else ""))

    labels = generate(LabelConfig(size=args.size, n_subsets=args.subsets, n_dev=args.dev), progress=progress)
    m_train = args.subsets - args.holdout
    eval_masks, eval_outputs = labels.masks[m_train:], labels.query_outputs[m_train:]
    pool_texts, dev_texts = pair_texts(labels.task.train), pair_texts(labels.dev)
    query_texts = pair_texts(labels.task.queries)
    n = len(pool_texts)
    print(f"# task      LM {args.size}: pool {n}, {len(dev_texts)} dev pairs, {len(query_texts)} held-out queries; "
          f"{m_train} training subsets, {args.holdout} held-out subsets")

    base = Encoder.from_pretrained(seed=0)
    start = time.perf_counter()
    pool_features = base.pooled(pool_texts, progress=progress, desc="backbone: pool")
    pool_embeddings = base.project(pool_features)
    embed_seconds = time.perf_counter() - start
    per_example_ms = 1e3 * embed_seconds / n
    dev_features = base.pooled(dev_texts, progress=progress, desc="backbone: dev")
    query_features = base.pooled(query_texts, progress=progress, desc="backbone: queries")

    untrained = f"MiniLM-L6 + seeded random projector (init scale {base.init_scale:g})"
    rows = [airrep_row(f"minilm-untrained{suffix}", base.project(query_features), pool_embeddings, eval_masks,
                       eval_outputs, pooling, per_example_ms, embed_seconds, 0.0, untrained)
            for pooling, suffix in (("attention", ""), ("sum", "/sum"))]
    for pooling, name in (("attention", "airrep"), ("sum", "airrep-sum")):
        encoder = Encoder.from_pretrained(seed=0)
        config = TrainConfig(steps=args.steps, lr=args.lr, pooling=pooling, trainable="projector")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)        # small ops: one thread is ~20x faster than two on a busy 2-core machine
        start = time.perf_counter()
        losses = train(encoder, pool_texts, dev_texts, labels.masks[:m_train], labels.dev_outputs[:m_train],
                       config, progress=progress, features=(pool_features, dev_features))
        train_seconds = time.perf_counter() - start
        torch.set_num_threads(threads)
        queries, pool = encoder.project(query_features), encoder.project(pool_features)
        note = (f"projector trained {args.steps} steps on {m_train} subsets, loss {losses[0]:.3f} -> "
                f"{sum(losses[-10:]) / 10:.3f}")
        rows.append(airrep_row(name, queries, pool, eval_masks, eval_outputs, pooling, per_example_ms,
                               embed_seconds, train_seconds, note))
        if pooling == "attention":
            rows.append(airrep_row("airrep/sum-inference", queries, pool, eval_masks, eval_outputs, "sum",
                                   per_example_ms, embed_seconds, train_seconds, "airrep encoder, sum pooling"))
    rows += gradient_rows(labels, eval_masks, eval_outputs, args.k, progress)
    by_method = {r["method"]: r["per_query"] for r in rows}
    for a, b in (("airrep", "minilm-untrained"), ("airrep", "airrep-sum"), ("airrep", f"logra{args.k}+ekfac"),
                 ("airrep", f"logra{args.k}+identity")):
        diff = by_method[a] - by_method[b]
        lo, hi = metrics.bootstrap_ci(diff)
        print(f"# paired LDS difference {a} - {b}: {float(diff.mean()):+.4f} (95% CI {lo:+.4f} .. {hi:+.4f}, "
              f"bootstrap over the {diff.numel()} queries)")
    best_gradient = min(r["ms_per_example"] for r in rows if r["method"].startswith("logra"))
    print(f"# embedding vs gradient featurization on LM {args.size}: {best_gradient / per_example_ms:.3g}x "
          f"(gradient ms / embedding ms per example; > 1 means the embedding is cheaper)")
    if args.cost_pairs:
        rows += inference_cost_rows(labels.task.train[: args.cost_pairs], base, args.k, progress)
    head["load_avg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    C.print_table(rows, COLUMNS, title="LDS on held-out subsets x held-out queries; cost per example")
    if not args.quick or args.out is not None:
        out = args.out or C.RESULTS / C.device_slug(head)
        out.mkdir(parents=True, exist_ok=True)
        print(f"wrote {C.write_csv(out / 'airrep.csv', rows, COLUMNS, head)}")
    return C.report_targets([], args.check)


if __name__ == "__main__":
    sys.exit(main())
