"""The chatterbot-corpus question -> answer pairs (``chatterbot_pairs``), deduplicated, with held-out queries and
category-balanced subsets; imports nothing from airtrace.

Every YAML file ``data/english/<category>.yml`` of the ``chatterbot-corpus``
package holds ``conversations``: lists of utterances in which each one answers
the previous. Each consecutive pair is one example.
"""

from __future__ import annotations

import importlib.util
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

CORPUS_PACKAGE = "chatterbot_corpus"

Pair = dict
"""One example: ``{"id": "ai/0", "category": "ai", "question": str, "answer": str}``."""


def corpus_dir() -> Path:
    """The ``data/english`` folder of the installed ``chatterbot-corpus`` package (not imported).

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the pip command).
    """
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the demo needs the chatterbot-corpus package: pip install chatterbot-corpus", name=CORPUS_PACKAGE
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "english"


def chatterbot_pairs(directory: str | Path | None = None) -> list[Pair]:
    """All (question, answer) pairs of the corpus, in a fixed order.

    Files are read in sorted name order, conversations and utterances in file
    order. Texts are stripped; pairs with an empty side are dropped. YAML
    scalars are read as plain strings (``yes`` stays "yes").

    Args:
        directory: folder of ``<category>.yml`` files; default :func:`corpus_dir`.

    Returns:
        Dicts with ``id`` ("<category>/<index within the category>"),
        ``category`` (the file stem), ``question`` and ``answer``.

    Raises:
        FileNotFoundError: the folder holds no ``.yml`` file.
    """
    import yaml

    folder = Path(directory) if directory is not None else corpus_dir()
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no chatterbot-corpus *.yml files in {folder}")
    pairs = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            conversations = (yaml.load(f, Loader=yaml.BaseLoader) or {}).get("conversations") or []
        index = 0
        for conversation in conversations:
            texts = [text.strip() for text in conversation]
            for question, answer in zip(texts, texts[1:]):
                if question and answer:
                    pairs.append(
                        {"id": f"{path.stem}/{index}", "category": path.stem, "question": question, "answer": answer}
                    )
                    index += 1
    return pairs


def unique(pairs: Iterable[Pair]) -> list[Pair]:
    """The pairs without repeats of the same (question, answer) text; the first occurrence is kept.

    The corpus repeats many pairs verbatim (e.g. tech_support); identical
    examples have identical gradients, and a held-out query must not stay in the
    training data under another id.
    """
    seen: set[tuple[str, str]] = set()
    kept = []
    for pair in pairs:
        key = (pair["question"], pair["answer"])
        if key not in seen:
            seen.add(key)
            kept.append(pair)
    return kept


def hold_out(pairs: Sequence[Pair], categories: Iterable[str]) -> tuple[list[Pair], list[Pair]]:
    """Take one query pair per category out of the data.

    In each category the question asked most often (first in file order on a
    tie) is chosen, and its first pair becomes the query. The other answers to
    that question stay in the training data: they are the attributions one
    expects to find on top.

    Args:
        pairs: the corpus, as from :func:`chatterbot_pairs`.
        categories: category names (file stems), one query each.

    Returns:
        (queries in ``categories`` order, remaining pairs in corpus order).

    Raises:
        ValueError: a category has no pair.
    """
    queries = []
    for category in categories:
        members = [p for p in pairs if p["category"] == category]
        if not members:
            known = sorted({p["category"] for p in pairs})
            raise ValueError(f"category {category!r} has no pairs; categories: {', '.join(known)}")
        counts: dict[str, int] = defaultdict(int)
        for p in members:
            counts[p["question"]] += 1
        question = max(counts, key=counts.get)  # dicts keep insertion order: first wins a tie
        queries.append(next(p for p in members if p["question"] == question))
    held = {q["id"] for q in queries}
    return queries, [p for p in pairs if p["id"] not in held]


def subsample(pairs: Sequence[Pair], n: int, *, keep: Iterable[str] = (), seed: int = 0) -> list[Pair]:
    """A deterministic subset of ``n`` pairs, balanced over categories.

    Pairs whose question is in ``keep`` come first; the rest is filled round-robin
    over categories (sorted), each category in a seeded shuffled order, so small
    categories are taken whole. The result is in corpus order.

    Args:
        pairs: candidate pairs.
        n: subset size; ``n >= len(pairs)`` returns all pairs.
        keep: questions whose pairs are always included; they count towards
            ``n`` (all are kept even when they alone exceed it).
        seed: shuffle seed.

    Returns:
        The chosen pairs, in the order of ``pairs``.
    """
    if n >= len(pairs):
        return list(pairs)
    keep = set(keep)
    chosen = {i for i, p in enumerate(pairs) if p["question"] in keep}
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        if i not in chosen:
            by_category[p["category"]].append(i)
    rng = random.Random(seed)
    queues = []
    for category in sorted(by_category):
        order = by_category[category]
        rng.shuffle(order)
        queues.append(order)
    while len(chosen) < n:
        for order in queues:
            if order and len(chosen) < n:
                chosen.add(order.pop())
    return [pairs[i] for i in sorted(chosen)]
