"""Featurize split over torchrun ranks: per-rank sub-stores that rank 0 merges into the final store, byte-identical to
one process; imports ``airtrace.distributed`` and ``airtrace.store``.

Rank r takes the r-th of N contiguous, equal blocks of the training batches (by
batch index; every rank sees the same batch order) and writes its own sub-store
``<store>.parts/rank-<r>-of-<N>`` (resumable, like any store). After all ranks
finish, rank 0 streams the sub-stores in rank order into the final store through
one :class:`airtrace.store.StoreWriter` (:func:`airtrace.store.merge_stores`), so
the final store holds the same ids in the same order and is byte-identical to a
single-process run (same shard boundaries, files and manifest); then it deletes
``<store>.parts``. Cost: one extra sequential read and write of the features on rank 0.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable

from airtrace import distributed
from airtrace.store import Store, StoreCompleteError, StoreError, merge_stores

PARTS_SUFFIX = ".parts"

WriteFeatures = Callable[..., Store]
"""``write(batches, path, *, total, overwrite, progress) -> Store``: one process's featurize loop."""


def parts_dir(path: str | os.PathLike) -> str:
    """Folder of the per-rank sub-stores of a distributed featurize into ``path``."""
    return os.fspath(path).rstrip(os.sep) + PARTS_SUFFIX


def rank_store_path(path: str | os.PathLike, r: int | None = None, world: int | None = None) -> str:
    """Sub-store of rank ``r`` of ``world``: ``<path>.parts/rank-<r>-of-<world>``."""
    r = distributed.rank() if r is None else r
    world = distributed.world_size() if world is None else world
    return os.path.join(parts_dir(path), f"rank-{r:05d}-of-{world:05d}")


def _complete(path: str) -> Store | None:
    """The finished store at ``path``, or None (missing, unfinished or unreadable)."""
    try:
        return Store.open(path)
    except StoreError:
        return None


def featurize_ranks(write: WriteFeatures, batches: Iterable, path: str | os.PathLike, *, total: int | None,
                    overwrite: bool, progress: bool) -> Store:
    """Featurize on every rank of the process group (see the module docstring); called on every rank.

    Args:
        write: the single-process featurize loop, run on this rank's block of ``batches``.
        batches: all training batches, the same on every rank.
        path: the final store.
        total: examples in ``batches`` (progress ETA).
        overwrite: replace an existing store (and sub-stores).
        progress: show progress bars (rank 0 only).

    Returns:
        The finished store, opened on every rank.

    Raises:
        DistributedError: another rank failed (its message is included).
        StoreCompleteError: the final store is complete already and ``overwrite`` is False.
    """
    path = os.fspath(path)
    if not overwrite and (done := _complete(path)) is not None:
        raise StoreCompleteError(path, len(done))
    with distributed.all_or_none("featurize"):
        part = rank_store_path(path)
        if overwrite or _complete(part) is None:  # a finished part (merge interrupted) is kept as it is
            write(distributed.rank_batches(batches), part, total=distributed.share(total), overwrite=overwrite,
                  progress=progress and distributed.is_main())
    with distributed.all_or_none("merging the per-rank stores"):
        if distributed.is_main():
            merge_stores([rank_store_path(path, r) for r in range(distributed.world_size())], path,
                         overwrite=overwrite, progress=progress)
            shutil.rmtree(parts_dir(path))
    return Store.open(path)
