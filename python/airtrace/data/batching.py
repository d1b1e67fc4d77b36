"""Pairs as training examples: the instruction format, tokens with the loss on the answer only, and ``(ids, batch)``
batches for the Attributor; imports ``airtrace.capture`` and ``airtrace.data.chatterbot``.

Each pair is one example::

    Question: <question>
    Answer: <answer>

The loss of an example counts the answer tokens only (instruction tuning): the
prompt ``"Question: <question>\\nAnswer:"`` and the response ``" <answer>"`` are
tokenized separately, so the boundary is exact, and the prompt tokens get the
label -100 (:func:`airtrace.capture.response_labels`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from airtrace.capture import response_labels
from airtrace.data.chatterbot import Pair

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
RESPONSE_TEMPLATE = " {answer}"


def format_example(question: str, answer: str) -> tuple[str, str]:
    """(prompt, response) texts; ``prompt + response`` is "Question: <q>\\nAnswer: <a>"."""
    return PROMPT_TEMPLATE.format(question=question), RESPONSE_TEMPLATE.format(answer=answer)


def tokens(pair: Pair, tokenize: Callable[[str], list[int]], max_length: int) -> tuple[list[int], int]:
    """Token ids of one example and its prompt length.

    The prompt keeps at most its last ``max_length // 2`` tokens (so "Answer:"
    survives), the response fills the rest up to ``max_length`` tokens.

    Args:
        pair: an example with ``question`` and ``answer``.
        tokenize: text -> token ids, without special tokens.
        max_length: most tokens per example (>= 2).

    Returns:
        (prompt + response ids, number of prompt ids).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    prompt, response = format_example(pair["question"], pair["answer"])
    prompt_ids = tokenize(prompt)[-(max_length // 2) :]
    return (prompt_ids + tokenize(response))[:max_length], len(prompt_ids)


def encode(
    pairs: Sequence[Pair], tokenize: Callable[[str], list[int]], *, max_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Tokenize a batch of pairs (see :func:`tokens`), right-padded to its longest example.

    Args:
        pairs: examples with ``question`` and ``answer``.
        tokenize: text -> token ids, without special tokens.
        max_length: most tokens per example (>= 2).
        pad_id: id used for padding (masked out; its label is -100).

    Returns:
        ``input_ids`` (B, T) int64, ``attention_mask`` (B, T) int64 and
        ``labels`` (B, T) int64 with -100 on prompt and padding tokens.
    """
    rows, prompt_lengths = zip(*(tokens(pair, tokenize, max_length) for pair in pairs))
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, : len(row)] = 1
    labels = response_labels(input_ids, attention_mask, prompt_lengths)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(
    pairs: Sequence[Pair], tokenize: Callable[[str], list[int]], *, batch_size: int, max_length: int, pad_id: int
) -> list[tuple[list[str], dict[str, torch.Tensor]]]:
    """``(ids, encoded batch)`` pairs for :class:`airtrace.attribute.Attributor`, grouped by length.

    Examples are stably sorted by token count before batching, so a batch pads
    little; the order is deterministic.

    Args:
        pairs: examples.
        tokenize: text -> token ids, without special tokens.
        batch_size: examples per batch.
        max_length: most tokens per example.
        pad_id: padding id.

    Returns:
        A list (re-iterable) of (example ids, :func:`encode` output).
    """
    order = sorted(pairs, key=lambda pair: len(tokens(pair, tokenize, max_length)[0]))
    return [
        ([p["id"] for p in chunk], encode(chunk, tokenize, max_length=max_length, pad_id=pad_id))
        for chunk in (order[i : i + batch_size] for i in range(0, len(order), batch_size))
    ]
