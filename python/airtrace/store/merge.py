"""Concatenating finished stores into one (``merge_stores``), byte-identical to one writer; imports ``airtrace.store``
modules, ``airtrace.profiling`` and ``airtrace.util``."""

from __future__ import annotations

import os

from airtrace.profiling import stage
from airtrace.store.errors import StoreError
from airtrace.store.reader import Store
from airtrace.store.writer import StoreWriter
from airtrace.util.progress import progress_bar


def merge_stores(parts: list[str], path: str | os.PathLike, *, overwrite: bool = False,
                 progress: bool = True) -> Store:
    """Concatenate finished stores (same settings) into one store, in order; resumes an interrupted merge.

    Rows are streamed one shard at a time (sha256 checked) and re-cut into the
    target's shards, so the result is byte-identical to writing the same rows
    with one writer.

    Args:
        parts: finished stores with equal fingerprint, layout, dtype, rows per shard and meta.
        path: target store directory.
        overwrite: replace an existing store at ``path``.
        progress: show a progress bar.

    Raises:
        StoreError: no parts, an unfinished part, or parts with different settings (names them).
    """
    if not parts:
        raise StoreError("merge_stores needs at least one store to merge")
    stores = [Store.open(p) for p in parts]
    first = stores[0]
    keys = ("fingerprint", "layout", "dtype", "rows_per_shard", "extras", "meta")
    for store in stores[1:]:
        diffs = [k for k in keys if store.manifest[k] != first.manifest[k]]
        if diffs:
            raise StoreError(f"{store.path}: cannot merge with {first.path}, their {', '.join(diffs)} differ")
    extras = {e["name"]: (e["dtype"], e["shape"]) for e in first.manifest["extras"]}
    with StoreWriter(path, first.fingerprint, first.manifest["layout"], first.manifest["dtype"], first.rows_per_shard,
                     first.meta, extras=extras, overwrite=overwrite) as writer:
        skip = writer.rows_done
        total = sum(len(s) for s in stores)
        with progress_bar(total, "merge stores", progress, initial=skip) as bar:
            for store in stores:
                for item in store.iter_shards("cpu", extras=list(extras)):
                    features, ids, more = item[1], item[2], item[3] if extras else {}
                    rows = features.shape[0]
                    if skip >= rows:
                        skip -= rows
                        continue
                    with stage("store_write"):
                        writer.append(features[skip:], ids[skip:], **{n: t[skip:] for n, t in more.items()})
                    bar.update(rows - skip)
                    skip = 0
    return Store.open(path)
