"""Training and query batches as the Attributor takes them: iterables of ``(ids, batch)`` pairs, checked, moved to a
device, and the content digest of each example; imports ``airtrace.store`` (ids) and the digest op."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from airtrace.ops.digest import digest
from airtrace.store import normalize_ids

CONTENT = "content_digest"
"""The store extra (rows, 2) int64 that holds each example's :func:`content_digests`."""


Batches = Iterable[tuple[Sequence, Any]]


def pairs(batches: Batches, what: str) -> Iterator[tuple[list, Any]]:
    """Yield (ids as a list, batch) from an iterable of (ids, batch) pairs."""
    if batches is None:
        raise ValueError(f"{what} is None; pass an iterable of (ids, batch) pairs")
    for item in batches:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"{what} must yield (ids, batch) pairs, got {type(item).__name__}")
        ids, batch = item
        yield normalize_ids(ids, len(ids)), batch


def reiterable(batches: Batches, what: str) -> Batches:
    if iter(batches) is batches:
        raise ValueError(
            f"{what} is a one-shot iterator but two passes are needed (K-FAC factors, then EK-FAC eigenvalues); "
            "pass a list or another re-iterable, or store=... for the second pass"
        )
    return batches


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors (also inside mappings, lists and tuples) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {key: to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(value, device) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(value, device) for value in obj)
    return obj


def attention_mask(batch: Any) -> torch.Tensor | None:
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def checked_rows(features: torch.Tensor, ids: list) -> torch.Tensor:
    if features.shape[0] != len(ids):
        raise ValueError(f"a batch has {len(ids)} ids but loss_fn returned {features.shape[0]} losses")
    return features


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors inside a batch (mappings in sorted key order, then sequences in order), depth first."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def content_digests(batch: Any, n: int) -> torch.Tensor:
    """(n, 2) int64 on the CPU: per example, a 128-bit digest of its rows of every tensor in ``batch``.

    A tensor whose first dimension is n contributes row i to example i; any other
    tensor (batch-wide, e.g. a scalar) contributes to every example. It identifies
    the data that reaches the model under an example id, so that a resume or a
    re-featurize with other data under the same ids is refused.
    """
    parts = []
    for t in _tensors(batch):
        t = t.detach()
        if t.dim() and t.shape[0] == n:
            parts.append(digest(t.reshape(n, -1)))
        else:
            parts.append(digest(t.reshape(1, -1)).expand(n, 2))
    rows = torch.cat([p.cpu() for p in parts], dim=1) if parts else torch.zeros(n, 0, dtype=torch.int64)
    return digest(rows)
