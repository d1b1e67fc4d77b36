"""Training and query batches as the Attributor takes them: iterables of ``(ids, batch)`` pairs, or a user's
DataLoader / dataset adapted to them (``as_batches``), checked, counted, moved to a device, and the content
digest of each example; imports ``airtrace.store`` (ids), the digest op and ``airtrace.capture`` (the label padding).

What is accepted, and where the example ids come from:

- an iterable of ``(ids, batch)`` pairs, ``ids`` a list (or tuple) of B unique str/int ids;
- a ``torch.utils.data.DataLoader`` (tuples, dicts, anything its collate_fn makes): the
  ids are the dataset indices of the examples in each batch (also when it shuffles), or
  the stream position for an IterableDataset;
- a Hugging Face ``datasets.Dataset`` or a map-style ``torch.utils.data.Dataset``: batched
  in order (``batch_size``, default 8), ids = row index;
- ``as_batches(data, id_column="id")`` takes the ids from a column of each batch instead.

A pair whose first element is a tensor or array is refused: it could be ``(ids, batch)``
or ``(inputs, labels)``, and reading token values as ids would be a silent wrong answer.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import Dataset as TorchDataset

from airtrace.capture import IGNORE_INDEX
from airtrace.ops.digest import digest
from airtrace.store import Store, StoreError, normalize_ids
from airtrace.util.fix import with_fix

CONTENT = "content_digest"
"""The store extra (rows, 2) int64 that holds each example's :func:`content_digests`."""

Batches = Iterable[tuple[Sequence, Any]]

DEFAULT_BATCH_SIZE = 8
"""Examples per batch when a dataset (not a DataLoader) is given without ``batch_size``."""


# --------------------------------------------------------------------------- adapters


def as_batches(data: Any, *, batch_size: int | None = None, id_column: str | int | None = None,
               collate_fn: Any = None) -> Batches:
    """A re-iterable of ``(ids, batch)`` pairs from what a user already has (see the module docstring).

    Args:
        data: (ids, batch) pairs, a DataLoader, a ``datasets.Dataset`` or a map-style torch Dataset.
        batch_size: examples per batch for a dataset (default 8); not for a DataLoader (it has its own).
        id_column: take each batch's ids from ``batch[id_column]`` (a dict key, or a tuple position)
            instead of the dataset index.
        collate_fn: list of examples -> batch, for a dataset (default: :func:`collate_records` for a
            ``datasets.Dataset``, torch's default collate for a torch Dataset).

    Returns:
        A re-iterable of (ids list, batch) pairs (sized when ``data`` is), unchanged when ``data``
        already is one.

    Raises:
        ValueError: ``batch_size`` / ``collate_fn`` given with a DataLoader, or a DataLoader that
            yields whole batches from its dataset (``batch_size=None``) without an ``id_column``.
    """
    if isinstance(data, (DataLoader, _Dataset)) or _is_dataset(data):
        if isinstance(data, DataLoader):
            if batch_size is not None or collate_fn is not None:
                raise ValueError("batch_size and collate_fn are the DataLoader's own; set them on the DataLoader")
            return _LoaderBatches(data, id_column)
        if isinstance(data, _Dataset):
            return data
        hf = _is_hf_dataset(data)
        loader = DataLoader(data, batch_size=batch_size or DEFAULT_BATCH_SIZE,
                            collate_fn=collate_fn or (collate_records if hf else None))
        return _LoaderBatches(loader, id_column)
    if batch_size is not None or collate_fn is not None:
        raise ValueError("batch_size and collate_fn apply to a dataset; (ids, batch) pairs are batched already")
    if id_column is not None:
        return _ColumnBatches(data, id_column)
    return data


def _is_hf_dataset(data: Any) -> bool:
    return type(data).__module__.split(".")[0] == "datasets" and hasattr(data, "column_names")


def _is_dataset(data: Any) -> bool:
    """A Hugging Face dataset, or a map-style / iterable torch Dataset."""
    return _is_hf_dataset(data) or isinstance(data, (TorchDataset, IterableDataset))


class _Dataset:
    """Marks adapted batches: iterating gives (ids, batch) pairs."""


class _Indexed(TorchDataset):
    """A map-style dataset whose items are ``(index, item)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return index, self.dataset[index]

    def __getitems__(self, indices):  # batched fetch (Hugging Face datasets implement it)
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(list(indices)) if fetch is not None else [self.dataset[i] for i in indices]
        return list(zip(indices, items))


class _IndexedCollate:
    """Collate of ``(index, item)`` pairs: (indices list, the user's collate of the items)."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, pairs):
        return [int(i) for i, _ in pairs], self.collate_fn([item for _, item in pairs])


class _LoaderBatches(_Dataset):
    """(ids, batch) pairs of a DataLoader: the dataset indices of each batch (it samples them itself), the stream
    position for an IterableDataset, or a column."""

    def __init__(self, loader: DataLoader, id_column: str | int | None):
        self.loader, self.id_column = loader, id_column
        iterable = isinstance(loader.dataset, IterableDataset)
        if id_column is None and not iterable and loader.batch_sampler is None:
            raise ValueError("a DataLoader with batch_size=None yields the dataset's items as whole batches, so there "
                             "is no example index to use as ids; name an id column: as_batches(loader, id_column=...)")

    def __len__(self) -> int:
        return len(self.loader)

    def examples(self) -> int | None:
        """Examples the loader yields (None when its dataset has no length)."""
        loader = self.loader
        if loader.batch_sampler is None or not isinstance(loader.sampler, Sized):
            return None
        n = len(loader.sampler)
        return n - n % loader.batch_size if loader.drop_last and loader.batch_size else n

    def __iter__(self) -> Iterator[tuple[list, Any]]:
        loader = self.loader
        if self.id_column is not None:
            for batch in loader:
                yield column_ids(batch, self.id_column), batch
        elif isinstance(loader.dataset, IterableDataset):
            position = 0
            for batch in loader:
                n = batch_rows(batch)
                yield list(range(position, position + n)), batch
                position += n
        else:
            indexed = DataLoader(
                _Indexed(loader.dataset), batch_sampler=loader.batch_sampler, num_workers=loader.num_workers,
                collate_fn=_IndexedCollate(loader.collate_fn), pin_memory=loader.pin_memory, timeout=loader.timeout,
                worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                generator=loader.generator, prefetch_factor=loader.prefetch_factor,
                persistent_workers=loader.persistent_workers)
            yield from indexed


class _ColumnBatches(_Dataset):
    """(ids, batch) pairs of an iterable of batches, the ids read from a column of each batch."""

    def __init__(self, batches: Iterable, id_column: str | int):
        self.batches, self.id_column = batches, id_column

    def __iter__(self) -> Iterator[tuple[list, Any]]:
        for batch in self.batches:
            yield column_ids(batch, self.id_column), batch


def column_ids(batch: Any, column: str | int) -> list:
    """The ids held in ``batch[column]`` as a list.

    Raises:
        ValueError: the batch has no such column.
    """
    try:
        ids = batch[column]
    except (KeyError, IndexError, TypeError):
        keys = list(batch) if isinstance(batch, Mapping) else f"{len(batch)} positions" if isinstance(
            batch, (tuple, list)) else type(batch).__name__
        raise ValueError(f"id_column {column!r} is not in the batch (it has {keys})") from None
    return ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else list(ids)


def batch_rows(batch: Any) -> int:
    """Examples in a batch: the first dim of its first tensor (also inside dicts, lists and tuples), else its length."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return int(batch.shape[0])
    values = list(batch.values()) if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    for value in values:
        if isinstance(value, (torch.Tensor, np.ndarray, Mapping, list, tuple)):
            return batch_rows(value)
    if isinstance(batch, (list, tuple)):
        return len(batch)
    raise ValueError(f"cannot tell how many examples a batch of type {type(batch).__name__} holds")


def select_rows(batch: Any, positions: list[int], n: int) -> Any:
    """The examples at ``positions`` of a batch of ``n``: tensors / arrays with n rows and lists of n items are
    indexed (also inside dicts, lists and tuples); anything else is kept as it is."""
    if isinstance(batch, (torch.Tensor, np.ndarray)) and batch.ndim >= 1 and batch.shape[0] == n:
        return batch[torch.as_tensor(positions)] if isinstance(batch, torch.Tensor) else batch[positions]
    if isinstance(batch, Mapping):
        return {key: select_rows(value, positions, n) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(select_rows(value, positions, n) for value in batch))
    if isinstance(batch, (list, tuple)):
        if len(batch) == n and not any(isinstance(v, (torch.Tensor, np.ndarray, Mapping, list, tuple)) for v in batch):
            return type(batch)(batch[j] for j in positions)
        return type(batch)(select_rows(value, positions, n) for value in batch)
    return batch


def collate_records(records: Sequence[Mapping]) -> dict:
    """A batch dict from a list of records (dataset rows, JSON lines): one entry per key.

    Numbers become a (B,) tensor, equal-length number lists or tensors a (B, T)
    tensor, ragged ones a right-padded (B, T) tensor (``labels`` padded with
    -100, others with 0); records with ``input_ids`` but no ``attention_mask``
    get one (1 on real tokens, 0 on padding). Anything else (text) stays a list.

    Raises:
        ValueError: records that are not mappings, or with different keys.
    """
    if not records or not all(isinstance(r, Mapping) for r in records):
        raise ValueError("records must be a non-empty list of dicts (one per example)")
    keys = list(records[0])
    if any(list(r) != keys for r in records):
        raise ValueError(f"records have different keys; the first has {keys}")
    batch: dict[str, Any] = {}
    lengths: dict[str, list[int]] = {}
    for key in keys:
        values = [r[key] for r in records]
        if all(isinstance(v, torch.Tensor) for v in values):
            values = [v.tolist() for v in values]
        if all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values)
        elif all(isinstance(v, (list, tuple)) and all(isinstance(x, numbers.Number) for x in v) for v in values):
            sizes = lengths[key] = [len(v) for v in values]
            pad = IGNORE_INDEX if key == "labels" else 0
            batch[key] = torch.tensor([list(v) + [pad] * (max(sizes) - len(v)) for v in values])
        else:
            batch[key] = values
    if "input_ids" in lengths and "attention_mask" not in batch:
        sizes = lengths["input_ids"]
        batch["attention_mask"] = (torch.arange(max(sizes))[None] < torch.tensor(sizes)[:, None]).long()
    return batch


# --------------------------------------------------------------------------- iterating


def pairs(batches: Any, what: str) -> Iterator[tuple[list, Any]]:
    """Yield (ids as a list, batch) from (ids, batch) pairs, a DataLoader or a dataset (:func:`as_batches`).

    Raises:
        ValueError: ``batches`` is None, or an item is not an (ids, batch) pair (a dict, a tensor, or a pair whose
            first element is a tensor / array: ambiguous with (inputs, labels)).
    """
    if batches is None:
        raise ValueError(f"{what} is None; pass a DataLoader, a dataset, or an iterable of (ids, batch) pairs")
    for item in as_batches(batches):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"{what} must yield (ids, batch) pairs, got {_describe(item)}. Fix: pass the DataLoader "
                             "or dataset itself (ids = dataset index), or airtrace.as_batches(..., id_column=...)")
        ids, batch = item
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            raise ValueError(
                f"{what} yielded a pair whose first element is {_describe(ids)}: is it (ids, batch) or (inputs, "
                "labels)? Fix: pass the DataLoader or dataset itself (ids = dataset index), or give ids as a list")
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise ValueError(f"{what}: the ids of a pair must be a list of str/int, got {_describe(ids)}")
        yield normalize_ids(ids, len(ids)), batch


def _describe(value: Any) -> str:
    """Type and shape of a value, never its contents (a tensor could be huge)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def example_count(batches: Any) -> int | None:
    """How many examples ``batches`` yields, when that is known without iterating it (for progress ETAs):
    a DataLoader or dataset with a length, or a list / tuple of (ids, batch) pairs."""
    batches = as_batches(batches) if batches is not None else None
    if isinstance(batches, _LoaderBatches):
        return batches.examples()
    if isinstance(batches, (list, tuple)):
        try:
            return sum(len(item[0]) for item in batches)
        except (TypeError, IndexError):
            return None
    return None


def reiterable(batches: Batches, what: str) -> Batches:
    if iter(batches) is batches:
        raise ValueError(
            f"{what} is a one-shot iterator but two passes are needed (K-FAC factors, then EK-FAC eigenvalues); "
            "pass a list or another re-iterable, or store=... for the second pass"
        )
    return batches


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with every tensor (also inside mappings, lists, tuples and named tuples) replaced by ``fn(tensor)``."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {key: map_tensors(value, fn) for key, value in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(value, fn) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(value, fn) for value in obj)
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors (also inside mappings, lists and tuples) moved to ``device``."""
    return map_tensors(obj, lambda tensor: tensor.to(device))


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


def stored_digests(store: Store) -> list[tuple[int, int]]:
    """The content digest of every row of ``store``, in row order."""
    return [tuple(row) for *_, extras in store.iter_shards(extras=[CONTENT]) for row in extras[CONTENT].tolist()]


def check_same_data(path: str, ids: list, digests: torch.Tensor, stored: Mapping) -> None:
    """Refuse an example whose id is in ``stored`` ({id: content digest}) with other content."""
    for example_id, row in zip(ids, digests.tolist()):
        if example_id in stored and stored[example_id] != tuple(row):
            raise with_fix(StoreError(
                f"{path}: example id {example_id!r} holds other data than when it was featurized (the digest of its "
                "batch tensors differs), so its stored features are not its features. Fix: featurize into a new "
                "directory, or pass overwrite=True to write the store again"),
                "featurize into a new directory, or pass --overwrite to write the store again.")


class DeviceBatches:
    """The batches of (ids, batch) pairs as a re-iterable of batches on ``device`` (the exact solver's passes)."""

    def __init__(self, batches: Batches, device: torch.device):
        self.batches, self.device = batches, device

    def __iter__(self):
        for _, batch in pairs(self.batches, "batches"):
            yield to_device(batch, self.device)

    def count(self) -> int:
        """Examples in the batches (their ids)."""
        return sum(len(ids) for ids, _ in pairs(self.batches, "batches"))
