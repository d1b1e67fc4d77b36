"""Writing a store (``StoreWriter``): append rows, flush full shards and the manifest atomically, resume or repair an
interrupted store; imports the other ``airtrace.store`` modules and ``airtrace.util``."""

from __future__ import annotations

import json
import logging
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from airtrace.store.errors import ShardError, StoreCompleteError, StoreError, StoreMismatchError
from airtrace.store.files import atomic_write, encode_shard
from airtrace.store.format import (
    EXTRA_DTYPES,
    FEATURES,
    IDS_FMT,
    IDS_INLINE_MAX,
    IDS_RE,
    LOCK,
    MANIFEST,
    MAX_ROWS_PER_SHARD,
    SHARD_FMT,
    SHARD_RE,
    STORE_DTYPES,
    TMP_RE,
    canonical_json,
    dtype_name,
    is_int,
    normalize_extras,
    normalize_ids,
    normalize_layout,
    shard_metadata,
)
from airtrace.store.lock import StoreLock
from airtrace.store.manifest import CONFIG_KEYS, ShardInfo, dump_manifest, load_manifest, manifest_dict, shard_infos
from airtrace.store.reader import Store
from airtrace.store.sidecars import SIDECAR_RE
from airtrace.store.verify import load_ids, verify_shard
from airtrace.util.checks import all_finite
from airtrace.util.fix import with_fix

log = logging.getLogger("airtrace")


class StoreWriter:
    """Append feature rows, flushing full shards atomically; resumes an interrupted store.

    Example::

        with StoreWriter(path, fingerprint, layout, "bfloat16", 4096, meta) as w:
            done = set(w.done_ids)
            for feats, ids in batches:            # feats (B, width)
                keep = [j for j, i in enumerate(ids) if i not in done]
                w.append(feats[keep], [ids[j] for j in keep])

    Leaving the ``with`` block by an exception does not finish the store, so
    it can be resumed. The writer holds the store's :class:`StoreLock` from
    ``__init__`` to :meth:`close` / :meth:`abort` (or until it is garbage
    collected); a second writer on the same directory gets :class:`StoreLockedError`.

    Attributes:
        path: the store directory.
        rows_done: rows already committed when the writer was opened (resume).
        done_ids: their ids, in row order.
        rows_written: rows appended so far, committed or buffered (includes ``rows_done``).
        removed_files: leftover temp / uncommitted files deleted on open.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str, layout: Any, dtype: Any = "float32",
                 rows_per_shard: int = MAX_ROWS_PER_SHARD, meta: Mapping | None = None, *, extras: Any = None,
                 overwrite: bool = False, repair: bool = False, check_finite: bool = True):
        """Open a new store, or resume an incomplete one with the same settings.

        Args:
            path: store directory (created if missing; must be empty or a store).
            fingerprint: model fingerprint (see :func:`model_fingerprint`).
            layout: feature blocks, see :func:`normalize_layout`.
            dtype: stored dtype, float32 / bfloat16 / float16 (or torch dtype).
            rows_per_shard: rows per shard file.
            meta: JSON-serialisable projection metadata (seeds, dims, kind, ...).
            extras: extra per-row tensors, ``{name: dtype}`` or ``{name: (dtype, trailing_shape)}``.
            overwrite: delete an existing store at ``path`` (its airtrace files only) first.
            repair: on resume, drop the first corrupt shard and everything after it
                instead of raising.
            check_finite: reject NaN/Inf features.

        Raises:
            StoreLockedError: another writer holds the store (names the lock file and its pid).
            StoreMismatchError: resuming with different settings.
            StoreError: ``path`` is a finished store, or not empty and not a store.
            ShardError: a committed shard is corrupt (and ``repair`` is False).
        """
        self.path = os.fspath(path)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise StoreError(f"fingerprint must be a non-empty str, got {fingerprint!r}")
        if not is_int(rows_per_shard) or rows_per_shard < 1:
            raise StoreError(f"rows_per_shard must be a positive int, got {rows_per_shard!r}")
        blocks = normalize_layout(layout)
        self._config = {
            "fingerprint": fingerprint,
            "layout": [b.to_json() for b in blocks],
            "width": sum(b.width for b in blocks),
            "dtype": dtype_name(dtype),
            "rows_per_shard": int(rows_per_shard),
            "extras": normalize_extras(extras),
            "meta": canonical_json(dict(meta or {}), "meta"),
        }
        self.width: int = self._config["width"]
        self.dtype = STORE_DTYPES[self._config["dtype"]]
        self.rows_per_shard = int(rows_per_shard)
        self.check_finite = check_finite
        self._extra_specs = {e["name"]: (EXTRA_DTYPES[e["dtype"]], tuple(e["shape"]))
                             for e in self._config["extras"]}
        self._shards: list[ShardInfo] = []
        self._closed = False
        self.removed_files: list[str] = []
        os.makedirs(self.path, exist_ok=True)
        self._lock = StoreLock(self.path).acquire()
        self._unlock = weakref.finalize(self, self._lock.release)
        try:
            self._open(overwrite=overwrite, repair=repair)
            self.rows_done = self._committed_rows()
            self.done_ids = [i for info in self._shards for i in load_ids(self.path, info)]
        except BaseException:
            self._unlock()
            raise
        self._seen = set(self.done_ids)
        self._buf = torch.empty(self.rows_per_shard, self.width, dtype=self.dtype)
        self._buf_extras = {n: torch.empty(self.rows_per_shard, *shape, dtype=dt)
                            for n, (dt, shape) in self._extra_specs.items()}
        self._buf_ids: list = []
        if self.rows_done:
            log.info("airtrace store %s: resuming after %d rows in %d shards", self.path, self.rows_done,
                     len(self._shards))

    # -- opening / resuming

    def _open(self, *, overwrite: bool, repair: bool) -> None:
        if overwrite:
            self._remove_store_files()
        self._remove_leftovers()
        if not os.path.exists(os.path.join(self.path, MANIFEST)):
            names = sorted(n for n in os.listdir(self.path) if n != LOCK)
            foreign = [n for n in names if not (SHARD_RE.match(n) or IDS_RE.match(n))]
            if foreign:
                raise StoreError(f"{self.path}: not empty and not an airtrace store (holds {foreign[:5]}). "
                                 "Fix: choose an empty or new directory.")
            if names:
                raise StoreError(f"{self.path}: holds shard files ({names[:3]}...) but no {MANIFEST}, so they "
                                 "cannot be resumed and are left alone. Fix: restore the manifest, or pass "
                                 "overwrite=True to delete them and write the store again.")
            self._write_manifest(complete=False)
            return
        manifest = load_manifest(self.path)
        diffs = [(k, manifest[k], self._config[k]) for k in CONFIG_KEYS if manifest[k] != self._config[k]]
        if diffs:
            raise StoreMismatchError(self.path, diffs)
        if manifest["complete"]:
            raise StoreCompleteError(self.path, manifest["total_rows"])
        self._shards = shard_infos(manifest)
        self._verify_committed(repair)
        self._remove_uncommitted(len(self._shards))

    def _verify_committed(self, repair: bool) -> None:
        for info in self._shards:
            try:
                verify_shard(self.path, self._config, info)
            except ShardError as exc:
                if not repair:
                    raise
                log.warning("airtrace store %s: dropping shard %d and later ones (%s)", self.path, info.index, exc)
                self._shards = self._shards[: info.index]
                self._write_manifest(complete=False)
                return

    def _remove_leftovers(self) -> None:
        for name in sorted(os.listdir(self.path)):
            if TMP_RE.match(name):
                os.unlink(os.path.join(self.path, name))
                self.removed_files.append(name)

    def _remove_uncommitted(self, n_committed: int) -> None:
        """Delete shard / ids files the manifest does not (yet) list: they are rewritten identically."""
        for name in sorted(os.listdir(self.path)):
            m = SHARD_RE.match(name) or IDS_RE.match(name)
            if m and int(m.group(1)) >= n_committed:
                os.unlink(os.path.join(self.path, name))
                self.removed_files.append(name)

    def _remove_store_files(self) -> None:
        for name in sorted(os.listdir(self.path)):
            if (name == MANIFEST or SHARD_RE.match(name) or IDS_RE.match(name) or TMP_RE.match(name)
                    or SIDECAR_RE.match(name)):
                os.unlink(os.path.join(self.path, name))

    def _committed_rows(self) -> int:
        return self._shards[-1].row_end if self._shards else 0

    # -- appending

    @property
    def rows_written(self) -> int:
        return self._committed_rows() + len(self._buf_ids)

    def append(self, features: torch.Tensor, ids: Sequence | None = None, **extras: torch.Tensor) -> None:
        """Append rows; every full shard is written out immediately.

        Args:
            features: (B, width), any float dtype and device; cast to the store dtype.
            ids: B example ids (str or int, unique in the store); None numbers
                the rows by their global index.
            **extras: the declared extra tensors, each (B, *trailing_shape).

        Raises:
            StoreError: wrong shape, non-finite values, duplicate ids, missing
                extras, or a closed writer.
        """
        if self._closed:
            raise StoreError(f"{self.path}: append() after close()")
        features = self._check_features(features)
        n = features.shape[0]
        ids = list(range(self.rows_written, self.rows_written + n)) if ids is None else normalize_ids(ids, n)
        features = self._check_finite(features, ids)
        extras = self._check_extras(extras, n)
        self._check_new_ids(ids)
        start = 0
        while start < n:
            fill = len(self._buf_ids)
            take = min(n - start, self.rows_per_shard - fill)
            self._buf[fill: fill + take] = features[start: start + take]
            for name, t in extras.items():
                self._buf_extras[name][fill: fill + take] = t[start: start + take]
            self._buf_ids.extend(ids[start: start + take])
            start += take
            if len(self._buf_ids) == self.rows_per_shard:
                self._flush(complete=False)

    def _check_features(self, features: Any) -> torch.Tensor:
        if not isinstance(features, torch.Tensor):
            features = torch.as_tensor(features)
        if features.dim() != 2 or features.shape[1] != self.width:
            raise StoreError(f"features must be (B, {self.width}) for this store's layout, "
                             f"got shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise StoreError(f"features must be a float tensor, got {features.dtype}")
        return features.detach().to("cpu")

    def _check_finite(self, features: torch.Tensor, ids: list) -> torch.Tensor:
        """``features`` in the store dtype, checked to be finite before and after the cast (when ``check_finite``)."""
        if self.check_finite and features.numel() and not all_finite(features):
            row = int((~torch.isfinite(features)).any(dim=1).nonzero()[0])
            raise StoreError(f"features row {row} of this batch has NaN/Inf values (example id {ids[row]!r}); "
                             "nothing from this batch was written")
        stored = features.to(self.dtype)
        if self.check_finite and stored.numel() and not all_finite(stored):
            row = int((~torch.isfinite(stored)).any(dim=1).nonzero()[0])
            name = self._config["dtype"]
            raise with_fix(StoreError(
                f"features row {row} of this batch (example id {ids[row]!r}) overflows the store dtype {name} (largest "
                f"finite value {torch.finfo(self.dtype).max:.6g}): it would be stored as inf and that row could not be "
                "scored; nothing from this batch was written. Fix: write the store as float32 or bfloat16 "
                "(dtype=...), or scale the loss down"),
                "write the store as float32 or bfloat16 (--dtype), or scale the loss down.")
        return stored

    def _check_extras(self, extras: Mapping[str, Any], n: int) -> dict[str, torch.Tensor]:
        if set(extras) != set(self._extra_specs):
            raise StoreError(f"append() needs exactly the extras {sorted(self._extra_specs)}, got {sorted(extras)}")
        out = {}
        for name, t in extras.items():
            t = torch.as_tensor(t).detach().to("cpu")
            _, shape = self._extra_specs[name]
            if tuple(t.shape) != (n, *shape):
                raise StoreError(f"extra {name!r} must have shape {(n, *shape)}, got {tuple(t.shape)}")
            out[name] = t
        return out

    def _check_new_ids(self, ids: list) -> None:
        if len(set(ids)) != len(ids):
            raise StoreError("ids repeat within this batch; every example id must be unique")
        dupes = self._seen.intersection(ids) | set(self._buf_ids).intersection(ids)
        if dupes:
            raise StoreError(f"{self.path}: ids already in the store, e.g. {sorted(map(str, dupes))[:3]}; "
                             f"skip rows whose ids are in writer.done_ids (rows_done={self.rows_done})")

    # -- flushing

    def _flush(self, *, complete: bool) -> None:
        """Write the buffered rows as the next shard, then the manifest."""
        rows = len(self._buf_ids)
        if rows:
            self._shards.append(self._write_shard(rows))
            self._seen.update(self._buf_ids)
            self._buf_ids = []
        self._write_manifest(complete=complete)

    def _write_shard(self, rows: int) -> ShardInfo:
        index = len(self._shards)
        row_start = self._committed_rows()
        ids = list(self._buf_ids)
        ids_file = ids_sha = None
        if rows > IDS_INLINE_MAX:
            ids_file = IDS_FMT.format(index)
            _, ids_sha = atomic_write(os.path.join(self.path, ids_file),
                                      [json.dumps(ids, separators=(",", ":")).encode()])
        tensors = {FEATURES: self._buf[:rows], **{n: t[:rows] for n, t in self._buf_extras.items()}}
        file = SHARD_FMT.format(index)
        nbytes, sha = atomic_write(os.path.join(self.path, file),
                                   encode_shard(tensors, shard_metadata(index, row_start)))
        return ShardInfo(index, file, row_start, row_start + rows, nbytes, sha,
                         None if ids_file else ids, ids_file, ids_sha)

    def _write_manifest(self, *, complete: bool) -> None:
        manifest = manifest_dict(self._config, self._shards, complete)
        atomic_write(os.path.join(self.path, MANIFEST), [dump_manifest(manifest)])

    def close(self) -> Store:
        """Write the last (partial) shard and the final manifest, and release the lock; idempotent.

        The lock is released even when writing fails; the store then stays resumable.

        Returns:
            The finished :class:`Store`.
        """
        if not self._closed:
            self._closed = True
            try:
                self._flush(complete=True)
            finally:
                self._unlock()
        return Store.open(self.path)

    def abort(self) -> None:
        """Stop writing without finishing the store: release the lock, drop the buffered rows.

        The committed shards stay; a later writer with the same settings resumes after them.
        """
        self._closed = True
        self._buf_ids = []
        self._unlock()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
