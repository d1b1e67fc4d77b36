"""On-disk feature store: safetensors shards plus ``manifest.json``; re-exports the names of its modules (format, files,
manifest, verify, reader, prefetch, lock, writer, sidecars, merge, fingerprint), which import only each other,
``airtrace.profiling``, ``airtrace.util`` and (the fingerprint) the digest op.

A store is a directory::

    manifest.json               format, fingerprint, layout, dtype, shards (sha256, ids), its own checksum
    shard-00000.safetensors     tensor "features" (rows, width) + optional per-row extras
    shard-00000.ids.json        example ids of a shard, only when there are many
    ...
    sidecar-<name>.safetensors  optional derived data (e.g. cached self-influence), see :mod:`airtrace.store.sidecars`
    writer.lock                 only while a writer is open: its pid and host, see :class:`StoreLock`

Rows are training examples; a row of ``width = sum(block widths)`` columns is
the concatenation of the per-layer blocks in ``layout`` (see :meth:`Store.split`).

Writing (:class:`StoreWriter`) is crash-safe: each shard and each manifest
version is written to a temp file in the store directory, fsynced and renamed
into place, and the manifest is rewritten after every full shard, so a killed
run loses at most the rows not yet flushed. Reopening a writer on an
incomplete store verifies what is there and resumes; the finished directory is
byte-identical to an uninterrupted run (shard bytes depend only on the rows,
ids and shard index; the manifest's key order is fixed; there are no timestamps).
One writer at a time: a writer holds ``writer.lock`` (flock(2), so the kernel
drops it when the process dies) and a second writer gets :class:`StoreLockedError`;
the file of a dead owner is taken over with a warning.

Reading (:class:`Store`) validates the manifest on open, checks every shard's
header against it whenever a shard is read, and checks sha256 in
:meth:`Store.verify` and (by default) while streaming. Shards are streamed one
at a time with a background prefetch thread (pinned memory and a side CUDA
stream when the target is a GPU); the whole store is never loaded.

Precision: features are kept in the store dtype (float32, bfloat16 or float16)
exactly as appended after a round-to-nearest cast; readers may ask for another
dtype, which is converted after the copy to the device.
"""

from airtrace.store.errors import (
    IncompleteStoreError,
    ManifestError,
    ShardError,
    SidecarError,
    StoreCompleteError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
)
from airtrace.store.files import ShardHeader, atomic_write, encode_shard, read_header
from airtrace.store.fingerprint import model_fingerprint
from airtrace.store.format import (
    EXTRA_DTYPES,
    FEATURES,
    IDS_FMT,
    LOCK,
    MANIFEST,
    MAX_ROWS_PER_SHARD,
    MAX_SHARD_BYTES,
    STORE_DTYPES,
    Block,
    default_rows_per_shard,
    dtype_name,
    normalize_ids,
    normalize_layout,
)
from airtrace.store.lock import StoreLock
from airtrace.store.manifest import ShardInfo, dump_manifest, load_manifest
from airtrace.store.merge import merge_stores
from airtrace.store.reader import ShardChunk, Store
from airtrace.store.verify import verify_shard
from airtrace.store.writer import StoreWriter

__all__ = [
    "Block",
    "EXTRA_DTYPES",
    "FEATURES",
    "IDS_FMT",
    "IncompleteStoreError",
    "LOCK",
    "MANIFEST",
    "MAX_ROWS_PER_SHARD",
    "MAX_SHARD_BYTES",
    "ManifestError",
    "STORE_DTYPES",
    "ShardChunk",
    "ShardError",
    "ShardHeader",
    "ShardInfo",
    "SidecarError",
    "Store",
    "StoreCompleteError",
    "StoreError",
    "StoreLock",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreWriter",
    "atomic_write",
    "default_rows_per_shard",
    "dtype_name",
    "dump_manifest",
    "encode_shard",
    "load_manifest",
    "merge_stores",
    "model_fingerprint",
    "normalize_ids",
    "normalize_layout",
    "read_header",
    "verify_shard",
]
