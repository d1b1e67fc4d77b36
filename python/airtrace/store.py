"""On-disk feature store: safetensors shards plus ``manifest.json``.

A store is a directory::

    manifest.json               format, fingerprint, layout, dtype, shards (sha256, ids)
    shard-00000.safetensors     tensor "features" (rows, width) + optional per-row extras
    shard-00000.ids.json        example ids of a shard, only when there are many
    ...
    sidecar-<name>.safetensors  optional derived data (e.g. cached self-influence), see :meth:`Store.sidecar_path`
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

from __future__ import annotations

import bisect
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import queue
import re
import socket
import struct
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

log = logging.getLogger("airtrace")

FORMAT_NAME = "airtrace-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = "writer.lock"
FEATURES = "features"
SHARD_FMT = "shard-{:05d}.safetensors"
IDS_FMT = "shard-{:05d}.ids.json"
IDS_INLINE_MAX = 1024
"""Shards with more rows than this keep their ids in a ``shard-NNNNN.ids.json`` file."""
MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Largest safetensors header accepted (the safetensors library's own limit)."""
MAX_MANIFEST_BYTES = 1 << 30
SHARD_METADATA_KEY = "airtrace"

_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
_IDS_RE = re.compile(r"^shard-(\d{5,})\.ids\.json$")
_TMP_RE = re.compile(r"^(?:shard-\d{5,}\.(?:safetensors|ids\.json)|manifest\.json)\.\d+\.tmp$")
_SIDECAR_RE = re.compile(r"^sidecar-[A-Za-z0-9_.\-]+\.safetensors(?:\.\d+\.tmp)?$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

MAX_ROWS_PER_SHARD = 4096
MAX_SHARD_BYTES = 128 * 2**20
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXTRA_DTYPES = {**STORE_DTYPES, "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "float": "float32", "f16": "float16", "fp64": "float64", "double": "float64"}
_ST_CODE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64", "int32": "I32"}
_ST_NAME = {code: name for name, code in _ST_CODE.items()}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


# ----------------------------------------------------------------------------- errors


class StoreError(ValueError):
    """Base class of every store problem; the message names the file and the fix."""


class ManifestError(StoreError):
    """``manifest.json`` is missing, unreadable or inconsistent."""


class ShardError(StoreError):
    """A shard (or ids file) is truncated, corrupt, foreign or does not match the manifest.

    Attributes:
        problems: ``[(path, message), ...]``, one entry per bad file.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"{path}: {msg}" for path, msg in problems]
        fix = ("Fix: delete the store and featurize again, or resume it with "
               "StoreWriter(..., repair=True), which drops the first bad shard and all after it "
               "so they are recomputed.")
        super().__init__("\n".join(lines + [fix]))

    @property
    def path(self) -> str:
        """The first bad file."""
        return self.problems[0][0]


class StoreMismatchError(StoreError):
    """A writer was opened on an existing store with different settings.

    Attributes:
        fields: names of the settings that differ (e.g. ``["fingerprint", "dtype"]``).
    """

    def __init__(self, path: str, diffs: list[tuple[str, Any, Any]]):
        self.fields = [name for name, _, _ in diffs]
        lines = [f"  {name}: store has {_short(old)}, writer has {_short(new)}" for name, old, new in diffs]
        super().__init__(
            f"{path}: cannot resume, the existing store was written with different settings "
            f"({', '.join(self.fields)}):\n" + "\n".join(lines)
            + "\nFix: write to a new directory, or pass overwrite=True to replace the store."
        )


class IncompleteStoreError(StoreError):
    """The store's writer never finished (no ``close()``)."""


class StoreCompleteError(StoreError):
    """A writer was opened (without overwrite) on a finished store with the same settings.

    Attributes:
        path: the store directory.
    """

    def __init__(self, path: str, rows: int):
        self.path = path
        super().__init__(f"{path}: the store is already complete ({rows} rows). "
                         "Fix: open it with Store.open, or pass overwrite=True to write it again.")


class StoreLockedError(StoreError):
    """Another writer (a live process, or another writer in this one) holds the store's lock.

    Attributes:
        lock_path: the lock file.
        owner: what the lock file says about its owner (``pid``, ``host``), possibly empty.
    """

    def __init__(self, lock_path: str, owner: Mapping[str, Any]):
        self.lock_path, self.owner = lock_path, dict(owner)
        who = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            who += " (this process: close the other StoreWriter first)"
        super().__init__(f"{lock_path}: the store is locked by another writer, {who}. Concurrent writers are "
                         "refused. Fix: wait for that process to finish (or stop it); a lock left by a dead "
                         "process is recovered automatically.")


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- layout, dtypes, ids


@dataclasses.dataclass(frozen=True)
class Block:
    """One named block of a feature row (e.g. one layer's projected gradient).

    Attributes:
        name: block name, e.g. ``"model.layers.3.mlp.down_proj"``.
        width: number of columns, ``prod(shape)``.
        shape: how the block's columns unflatten, e.g. ``(k_out, k_in)``.
    """

    name: str
    width: int
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "width": self.width, "shape": list(self.shape)}


def normalize_layout(layout: Any) -> list[Block]:
    """Turn a layout spec into a list of :class:`Block`.

    Args:
        layout: one of an int ``width`` (one block named "features"); a mapping
            ``name -> width | shape``; a sequence of ``(name, width | shape)``
            pairs, of ``{"name", "width"[, "shape"]}`` dicts, or of ``Block``.

    Returns:
        The blocks, in row order.

    Raises:
        StoreError: empty layout, duplicate names, non-positive widths, or a
            shape whose product is not the width.
    """
    if isinstance(layout, bool):
        raise StoreError(f"layout must be an int width, a mapping or a sequence of blocks, got {layout!r}")
    if isinstance(layout, int):
        layout = [(FEATURES, layout)]
    elif isinstance(layout, Mapping):
        layout = list(layout.items())
    if not isinstance(layout, Sequence) or isinstance(layout, (str, bytes)) or not layout:
        raise StoreError(f"layout must be a non-empty sequence of (name, width) blocks, got {layout!r}")
    blocks = [_block(item) for item in layout]
    names = [b.name for b in blocks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StoreError(f"layout has duplicate block names {dupes}")
    return blocks


def _block(item: Any) -> Block:
    if isinstance(item, Block):
        name, width, shape = item.name, item.width, item.shape
    elif isinstance(item, Mapping):
        name, width, shape = item.get("name"), item.get("width"), item.get("shape")
    elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
        name, size = item
        width, shape = (size, None) if _is_int(size) else (None, size)
    else:
        raise StoreError(f"layout block must be (name, width), (name, shape) or a dict, got {item!r}")
    if not isinstance(name, str) or not name:
        raise StoreError(f"layout block name must be a non-empty str, got {name!r}")
    if shape is not None:
        if not isinstance(shape, Sequence) or not shape or not all(_is_int(s) and s > 0 for s in shape):
            raise StoreError(f"layout block {name!r}: shape must be a list of positive ints, got {shape!r}")
        shape = tuple(int(s) for s in shape)
        if width is None:
            width = math.prod(shape)
    if not _is_int(width) or width < 1:
        raise StoreError(f"layout block {name!r}: width must be a positive int, got {width!r}")
    shape = shape or (int(width),)
    if math.prod(shape) != width:
        raise StoreError(f"layout block {name!r}: shape {list(shape)} has {math.prod(shape)} entries, width is {width}")
    return Block(name, int(width), shape)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def default_rows_per_shard(width: int, dtype: Any) -> int:
    """Rows per shard when none is given: MAX_ROWS_PER_SHARD, fewer for wide rows so that a shard
    (which the writer buffers and the reader prefetches whole) stays within MAX_SHARD_BYTES."""
    row_bytes = width * STORE_DTYPES[dtype_name(dtype)].itemsize
    return max(1, min(MAX_ROWS_PER_SHARD, MAX_SHARD_BYTES // max(row_bytes, 1)))


def dtype_name(dtype: Any, allowed: Mapping[str, torch.dtype] = STORE_DTYPES) -> str:
    """Canonical name ("float32", "bfloat16", "float16", ...) of a torch dtype or alias string.

    Raises:
        StoreError: the dtype is not one of ``allowed``.
    """
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    else:
        name = repr(dtype)
    if name not in allowed:
        raise StoreError(f"dtype must be one of {sorted(allowed)}, got {dtype!r}")
    return name


def normalize_ids(ids: Any, n: int) -> list:
    """Example ids as a list of ``int`` / ``str`` of length ``n``.

    Args:
        ids: sequence (or 1-D tensor / array) of str or int ids; None for none.
        n: expected count.

    Raises:
        StoreError: wrong count or an id that is neither str nor int.
    """
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise StoreError(f"ids must be a sequence of str/int ids, got {type(ids).__name__}")
    if len(ids) != n:
        raise StoreError(f"ids has {len(ids)} entries but features has {n} rows")
    out = []
    for i in ids:
        if _is_int(i):
            out.append(int(i))
        elif isinstance(i, str):
            out.append(i)
        else:
            raise StoreError(f"ids must be str or int, got {i!r} ({type(i).__name__})")
    return out


def _canonical_json(value: Any, what: str) -> Any:
    """JSON round trip with sorted keys: what the manifest stores and compares."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be JSON-serialisable (no NaN/Inf): {exc}") from None


def _normalize_extras(extras: Any) -> list[dict]:
    """Extra per-row tensors: ``{name: dtype}`` or ``{name: (dtype, trailing_shape)}`` or names (float32)."""
    if extras is None:
        return []
    if not isinstance(extras, Mapping):
        extras = {name: "float32" for name in extras}
    out = []
    for name in sorted(extras):
        spec = extras[name]
        dtype, shape = (spec if isinstance(spec, (tuple, list)) else (spec, ()))
        if not isinstance(name, str) or not _NAME_RE.match(name) or name == FEATURES:
            raise StoreError(f"extra tensor name must be an identifier other than {FEATURES!r}, got {name!r}")
        if not all(_is_int(s) and s > 0 for s in shape):
            raise StoreError(f"extra {name!r}: trailing shape must be positive ints, got {shape!r}")
        out.append({"name": name, "dtype": dtype_name(dtype, EXTRA_DTYPES), "shape": [int(s) for s in shape]})
    return out


# ----------------------------------------------------------------------------- low-level file helpers


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(final: str) -> str:
    return f"{final}.{os.getpid()}.tmp"


def atomic_write(final: str, chunks: Sequence[bytes | memoryview]) -> tuple[int, str]:
    """Write ``chunks`` to ``final`` via temp file + fsync + rename, so a crash leaves the old file or the new one.

    The temp file ``<final>.<pid>.tmp`` is deleted when writing fails.

    Args:
        final: the file to (re)place.
        chunks: its content, in order.

    Returns:
        (size in bytes, sha256 hex of the content).
    """
    tmp = _tmp_path(final)
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(final) or ".")
    return size, digest.hexdigest()


def _parse_json(raw: bytes) -> Any:
    """``json.loads`` of UTF-8 bytes; every way it can fail on hostile input becomes a ValueError.

    Besides malformed JSON, that is invalid UTF-8, integers longer than Python's
    digit limit, and nesting deeper than the recursion limit.
    """
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in a non-empty tensor (min/max propagate NaN; ~9x faster than isfinite().all())."""
    return all(bool(torch.isfinite(v)) for v in torch.aminmax(t))


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def _sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


def encode_shard(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> list[bytes | memoryview]:
    """Serialise tensors in the safetensors format, deterministically.

    Tensors are laid out by (item size descending, name) so every tensor is
    aligned; the header is compact JSON padded with spaces to 8 bytes. The
    result is readable by ``safetensors.safe_open``.

    Args:
        tensors: name -> contiguous CPU tensor.
        metadata: str -> str, stored under ``__metadata__``.

    Returns:
        Chunks to write in order (length prefix + header, then tensor bytes).
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_CODE[dtype_name(t.dtype, EXTRA_DTYPES)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return [struct.pack("<Q", len(raw)) + raw] + [_tensor_bytes(tensors[n]) for n in order]


@dataclasses.dataclass(frozen=True)
class ShardHeader:
    """A parsed, bounds-checked safetensors header.

    Attributes:
        data_start: byte offset of the data section in the file.
        tensors: name -> (safetensors dtype code, shape, (begin, end) offsets in the data section).
        metadata: the ``__metadata__`` dict.
        raw: the first ``data_start`` bytes of the file (for hashing).
    """

    data_start: int
    tensors: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]
    metadata: dict[str, str]
    raw: bytes


def read_header(path: str, f=None) -> ShardHeader:
    """Parse and bounds-check a safetensors header without trusting any size in it.

    Args:
        path: the file (named in errors).
        f: an open binary file to read from instead of opening ``path``.

    Returns:
        The header.

    Raises:
        ShardError: truncated file, not a safetensors file, or sizes/offsets
            that do not fit the file (e.g. a header claiming absurd sizes).
    """
    if f is None:
        with open(path, "rb") as fh:
            return read_header(path, fh)
    size = os.fstat(f.fileno()).st_size

    def bad(msg: str) -> ShardError:
        return ShardError([(path, msg)])

    if size < 8:
        raise bad(f"truncated or not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        raise bad(f"not a valid safetensors file: header claims {n} bytes (limit {MAX_HEADER_BYTES})")
    if 8 + n > size:
        raise bad(f"truncated: header claims {n} bytes but the file has only {size - 8} after the length prefix")
    raw = f.read(n)
    try:
        header = _parse_json(raw)
    except ValueError as exc:
        raise bad(f"not a safetensors file: the header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("not a safetensors file: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise bad("not a safetensors file: __metadata__ is not an object")
    data_len = size - 8 - n
    tensors = {}
    end_max = 0
    for name, info in header.items():
        tensors[name] = _check_tensor_info(name, info, data_len, bad)
        end_max = max(end_max, tensors[name][2][1])
    if end_max > data_len:
        raise bad(f"truncated: the header describes {end_max} data bytes but the file holds {data_len}")
    if end_max < data_len:
        raise bad(f"corrupt: {data_len - end_max} trailing bytes after the last tensor")
    return ShardHeader(8 + n, tensors, metadata, struct.pack("<Q", n) + raw)


def _check_tensor_info(name: str, info: Any, data_len: int, bad) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"not a safetensors file: entry {name!r} is not a tensor description")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in _ST_ITEMSIZE:
        raise bad(f"tensor {name!r} has unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * _ST_ITEMSIZE[code]
    if nbytes != offsets[1] - offsets[0]:
        raise bad(f"header claims absurd sizes: tensor {name!r} of shape {shape} needs {nbytes} bytes "
                  f"but its data_offsets span {offsets[1] - offsets[0]}")
    if offsets[1] > data_len:
        raise bad(f"truncated or absurd header: tensor {name!r} ends at data byte {offsets[1]} "
                  f"but the file holds {data_len}")
    return code, tuple(shape), (offsets[0], offsets[1])


# ----------------------------------------------------------------------------- manifest


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One manifest shard entry.

    Attributes:
        index: shard number (position in the manifest).
        file: file name inside the store directory.
        row_start, row_end: global rows ``[row_start, row_end)`` it holds.
        nbytes: file size in bytes.
        sha256: hex digest of the file.
        ids: inline ids, or None when they live in ``ids_file``.
        ids_file, ids_sha256: the ids file and its digest (None when inline).
    """

    index: int
    file: str
    row_start: int
    row_end: int
    nbytes: int
    sha256: str
    ids: list | None
    ids_file: str | None
    ids_sha256: str | None

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    def to_json(self) -> dict:
        entry = {"file": self.file, "row_start": self.row_start, "row_end": self.row_end,
                 "bytes": self.nbytes, "sha256": self.sha256}
        if self.ids_file is None:
            entry["ids"] = self.ids
        else:
            entry["ids_file"] = self.ids_file
            entry["ids_sha256"] = self.ids_sha256
        return entry


def _manifest_dict(config: dict, shards: Sequence[ShardInfo], complete: bool) -> dict:
    """The manifest with its fixed key order."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "complete": complete,
        "fingerprint": config["fingerprint"],
        "layout": config["layout"],
        "width": config["width"],
        "dtype": config["dtype"],
        "rows_per_shard": config["rows_per_shard"],
        "extras": config["extras"],
        "meta": config["meta"],
        "total_rows": shards[-1].row_end if shards else 0,
        "shards": [s.to_json() for s in shards],
    }


def dump_manifest(manifest: Mapping) -> bytes:
    """Deterministic manifest text: one top-level key per line, one shard per line."""
    compact = lambda v: json.dumps(v, separators=(", ", ": "), allow_nan=False)  # noqa: E731
    parts = []
    for key, value in manifest.items():
        if key == "shards" and value:
            text = "[\n" + ",\n".join("    " + compact(s) for s in value) + "\n  ]"
        else:
            text = compact(value)
        parts.append(f"  {json.dumps(key)}: {text}")
    return ("{\n" + ",\n".join(parts) + "\n}\n").encode()


_CONFIG_KEYS = ("fingerprint", "layout", "width", "dtype", "rows_per_shard", "extras", "meta")


def _config_of(manifest: Mapping) -> dict:
    return {k: manifest[k] for k in _CONFIG_KEYS}


def load_manifest(path: str) -> dict:
    """Read and fully validate ``<path>/manifest.json``.

    Checks the schema, format/version, layout widths against ``width``, dtype,
    shard file names, contiguous row ranges, full shards except the last, ids
    counts and types, and the total row count.

    Args:
        path: store directory.

    Returns:
        The manifest dict.

    Raises:
        ManifestError: naming the manifest file, the field and what to do.
    """
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ManifestError(f"{path}: not a directory; a store is a directory holding {MANIFEST}")
    if not os.path.exists(mpath):
        raise ManifestError(f"{mpath}: missing; {path} is not an airtrace store (or its writer never started)")
    if os.path.getsize(mpath) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{mpath}: {os.path.getsize(mpath)} bytes, larger than any valid manifest")
    try:
        with open(mpath, "rb") as f:
            manifest = _parse_json(f.read())
    except ValueError as exc:
        raise ManifestError(f"{mpath}: not valid JSON ({exc}); the file is corrupt or not a manifest") from None
    _validate_manifest(mpath, manifest)
    return manifest


def _validate_manifest(mpath: str, m: Any) -> None:
    def bad(msg: str) -> ManifestError:
        return ManifestError(f"{mpath}: {msg}")

    if not isinstance(m, dict):
        raise bad("not a JSON object")
    if m.get("format") != FORMAT_NAME:
        raise bad(f"format is {m.get('format')!r}, expected {FORMAT_NAME!r}: not an airtrace store manifest")
    if m.get("version") != FORMAT_VERSION:
        raise bad(f"version {m.get('version')!r} is not supported (this airtrace reads version {FORMAT_VERSION}); "
                  "upgrade airtrace or re-create the store")
    expected = ("format", "version", "complete") + _CONFIG_KEYS + ("total_rows", "shards")
    missing = [k for k in expected if k not in m]
    if missing:
        raise bad(f"missing fields {missing}")
    if not isinstance(m["complete"], bool):
        raise bad(f"complete must be true/false, got {m['complete']!r}")
    if not isinstance(m["fingerprint"], str) or not m["fingerprint"]:
        raise bad(f"fingerprint must be a non-empty string, got {m['fingerprint']!r}")
    try:
        blocks = normalize_layout(m["layout"])
        dtype_name(m["dtype"])
        extras = _normalize_extras({e["name"]: (e["dtype"], e["shape"]) for e in m["extras"]})
    except (StoreError, TypeError, KeyError) as exc:
        raise bad(f"invalid layout/dtype/extras: {exc}") from None
    if [b.to_json() for b in blocks] != m["layout"] or extras != m["extras"] or m["dtype"] not in STORE_DTYPES:
        raise bad("layout/dtype/extras are not in canonical form")
    width = sum(b.width for b in blocks)
    if m["width"] != width:
        raise bad(f"width is {m['width']!r} but the layout blocks sum to {width}; the manifest has wrong dims")
    if not _is_int(m["rows_per_shard"]) or m["rows_per_shard"] < 1:
        raise bad(f"rows_per_shard must be a positive int, got {m['rows_per_shard']!r}")
    if not isinstance(m["meta"], dict):
        raise bad(f"meta must be an object, got {type(m['meta']).__name__}")
    if not isinstance(m["shards"], list):
        raise bad("shards must be a list")
    row = 0
    seen: dict = {}
    for i, entry in enumerate(m["shards"]):
        _validate_shard_entry(bad, i, entry, row, m["rows_per_shard"], last=i == len(m["shards"]) - 1,
                              complete=m["complete"])
        for j, example_id in enumerate(entry.get("ids", ())):
            first = seen.setdefault(example_id, (i, j))
            if first != (i, j):
                raise bad(f"example id {example_id!r} repeats (shards[{first[0]}].ids[{first[1]}] and "
                          f"shards[{i}].ids[{j}]); every example id must be unique")
        row = entry["row_end"]
    if not _is_int(m["total_rows"]) or m["total_rows"] != row:
        raise bad(f"total_rows is {m['total_rows']!r} but the shards hold {row} rows")


def _validate_shard_entry(bad, i: int, e: Any, row: int, rows_per_shard: int, last: bool, complete: bool) -> None:
    where = f"shards[{i}]"
    if not isinstance(e, dict):
        raise bad(f"{where} is not an object")
    for key in ("file", "row_start", "row_end", "bytes", "sha256"):
        if key not in e:
            raise bad(f"{where} has no {key!r}")
    if e["file"] != SHARD_FMT.format(i):
        raise bad(f"{where}.file is {e['file']!r}, expected {SHARD_FMT.format(i)!r}")
    if not _is_int(e["row_start"]) or e["row_start"] != row:
        raise bad(f"{where}.row_start is {e['row_start']!r}, expected {row}: row ranges must be contiguous")
    if not _is_int(e["row_end"]) or not row < e["row_end"] <= row + rows_per_shard:
        raise bad(f"{where}.row_end is {e['row_end']!r}, expected in ({row}, {row + rows_per_shard}]")
    rows = e["row_end"] - row
    if rows != rows_per_shard and not (last and complete):
        raise bad(f"{where} holds {rows} rows; only the last shard of a complete store may hold fewer "
                  f"than rows_per_shard={rows_per_shard}")
    if not _is_int(e["bytes"]) or e["bytes"] < 8:
        raise bad(f"{where}.bytes must be an int >= 8, got {e['bytes']!r}")
    if not isinstance(e["sha256"], str) or not _SHA_RE.match(e["sha256"]):
        raise bad(f"{where}.sha256 must be 64 lowercase hex digits")
    if "ids" in e:
        if "ids_file" in e:
            raise bad(f"{where} has both ids and ids_file")
        try:
            normalize_ids(e["ids"], rows)
        except StoreError as exc:
            raise bad(f"{where}.ids: {exc}") from None
    elif "ids_file" in e:
        if e["ids_file"] != IDS_FMT.format(i):
            raise bad(f"{where}.ids_file is {e['ids_file']!r}, expected {IDS_FMT.format(i)!r}")
        if not isinstance(e.get("ids_sha256"), str) or not _SHA_RE.match(e["ids_sha256"]):
            raise bad(f"{where}.ids_sha256 must be 64 lowercase hex digits")
    else:
        raise bad(f"{where} has neither ids nor ids_file")


def _shard_infos(manifest: Mapping) -> list[ShardInfo]:
    return [
        ShardInfo(i, e["file"], e["row_start"], e["row_end"], e["bytes"], e["sha256"],
                  e.get("ids"), e.get("ids_file"), e.get("ids_sha256"))
        for i, e in enumerate(manifest["shards"])
    ]


# ----------------------------------------------------------------------------- shard checks and loading


def _expected_tensors(config: Mapping, rows: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {FEATURES: (_ST_CODE[config["dtype"]], (rows, config["width"]))}
    for e in config["extras"]:
        out[e["name"]] = (_ST_CODE[e["dtype"]], (rows, *e["shape"]))
    return out


def _shard_metadata(index: int, row_start: int) -> dict[str, str]:
    return {SHARD_METADATA_KEY: json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                            "shard": index, "row_start": row_start}, separators=(",", ":"))}


def _check_header_matches(path: str, header: ShardHeader, config: Mapping, info: ShardInfo) -> None:
    """Header vs manifest: tensor names, dtypes, shapes, shard metadata."""
    expected = _expected_tensors(config, info.rows)
    if set(header.tensors) != set(expected):
        raise ShardError([(path, f"foreign file: tensors {sorted(header.tensors)}, an airtrace shard holds "
                                 f"{sorted(expected)}")])
    for name, (code, shape) in expected.items():
        got_code, got_shape, _ = header.tensors[name]
        if (got_code, got_shape) != (code, shape):
            raise ShardError([(path, f"tensor {name!r} is {_ST_NAME.get(got_code, got_code)} {list(got_shape)}, "
                                     f"the manifest says {_ST_NAME[code]} {list(shape)}")])
    if header.metadata != _shard_metadata(info.index, info.row_start):
        raise ShardError([(path, f"foreign or misplaced shard: metadata {header.metadata} does not mark it as "
                                 f"shard {info.index} starting at row {info.row_start}")])


class _LoadedShard(NamedTuple):
    info: ShardInfo
    tensors: dict[str, torch.Tensor]


def _readinto_all(f, buf: torch.Tensor, path: str) -> None:
    view = memoryview(buf.numpy())
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise ShardError([(path, f"truncated: ended after {got} of {len(view)} data bytes")])
        got += n


def _load_shard(root: str, config: Mapping, info: ShardInfo, *, verify: bool, pin: bool,
                names: Sequence[str]) -> _LoadedShard:
    """Read one shard into CPU memory (pinned if asked), checking header and optionally sha256."""
    path = os.path.join(root, info.file)
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise ShardError([(path, "missing: the manifest lists it but the file does not exist")]) from None
    with f:
        header = read_header(path, f)
        _check_header_matches(path, header, config, info)
        size = os.fstat(f.fileno()).st_size
        if size != info.nbytes:
            raise ShardError([(path, f"size is {size} bytes, the manifest says {info.nbytes}: truncated or replaced")])
        buf = torch.empty(size - header.data_start, dtype=torch.uint8, pin_memory=pin)
        f.seek(header.data_start)
        _readinto_all(f, buf, path)
    if verify:
        digest = hashlib.sha256(header.raw)
        digest.update(memoryview(buf.numpy()))
        if digest.hexdigest() != info.sha256:
            raise ShardError([(path, "sha256 mismatch: the content changed since it was written (flipped bytes?)")])
    tensors = {}
    for name in names:
        code, shape, (b, e) = header.tensors[name]
        dtype = EXTRA_DTYPES[_ST_NAME[code]]
        raw = buf[b:e]
        if b % torch.empty(0, dtype=dtype).element_size():
            raw = raw.clone()  # misaligned offsets (not written by airtrace): copy to realign
        tensors[name] = raw.view(dtype).view(shape)
    return _LoadedShard(info, tensors)


def _load_ids(root: str, info: ShardInfo) -> list:
    if info.ids_file is None:
        return list(info.ids)
    path = os.path.join(root, info.ids_file)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ShardError([(path, "missing: the manifest lists it but the file does not exist")]) from None
    if hashlib.sha256(raw).hexdigest() != info.ids_sha256:
        raise ShardError([(path, "sha256 mismatch: the ids file changed since it was written")])
    try:
        return normalize_ids(_parse_json(raw), info.rows)
    except ValueError as exc:
        raise ShardError([(path, f"invalid ids file: {exc}")]) from None


def verify_shard(root: str, config: Mapping, info: ShardInfo) -> None:
    """Check one shard file (header, dtypes, shapes, size, sha256) and its ids.

    Raises:
        ShardError: naming the file.
    """
    path = os.path.join(root, info.file)
    if not os.path.exists(path):
        raise ShardError([(path, "missing: the manifest lists it but the file does not exist")])
    with open(path, "rb") as f:
        header = read_header(path, f)
        size = os.fstat(f.fileno()).st_size
    _check_header_matches(path, header, config, info)
    if size != info.nbytes:
        raise ShardError([(path, f"size is {size} bytes, the manifest says {info.nbytes}: truncated or replaced")])
    if _sha256_file(path) != info.sha256:
        raise ShardError([(path, "sha256 mismatch: the content changed since it was written (flipped bytes?)")])
    _load_ids(root, info)


# ----------------------------------------------------------------------------- reader


class ShardChunk(NamedTuple):
    """One streamed shard.

    Attributes:
        row_offset: global index of the first row.
        features: (rows, width) on the requested device/dtype.
        ids: the rows' example ids.
    """

    row_offset: int
    features: torch.Tensor
    ids: list


class Store:
    """Read-only view of a finished store; see the module docstring for the layout.

    Attributes:
        path: the store directory.
        manifest: the validated manifest dict.
        fingerprint: model fingerprint string the features belong to.
        layout: feature blocks (list of :class:`Block`), in column order.
        width: columns per row, ``sum(block.width)``.
        dtype: stored dtype (float32, bfloat16 or float16).
        rows_per_shard: rows in every shard but the last.
        meta: projection metadata given to the writer.
        shards: list of :class:`ShardInfo`.
    """

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.fingerprint: str = manifest["fingerprint"]
        self.layout = normalize_layout(manifest["layout"])
        self.width: int = manifest["width"]
        self.dtype: torch.dtype = STORE_DTYPES[manifest["dtype"]]
        self.rows_per_shard: int = manifest["rows_per_shard"]
        self.meta: dict = manifest["meta"]
        self.extras: list[str] = [e["name"] for e in manifest["extras"]]
        self.complete: bool = manifest["complete"]
        self.shards = _shard_infos(manifest)
        self._config = _config_of(manifest)

    @classmethod
    def open(cls, path: str | os.PathLike, *, allow_incomplete: bool = False) -> Store:
        """Open and validate a store (manifest only; shard files are checked when read or verified).

        Args:
            path: store directory.
            allow_incomplete: also open a store whose writer was not closed
                (only its full, committed shards are visible).

        Raises:
            ManifestError: bad manifest (names the file and field).
            IncompleteStoreError: the writer never finished and ``allow_incomplete`` is False.
        """
        path = os.fspath(path)
        manifest = load_manifest(path)
        if not manifest["complete"] and not allow_incomplete:
            raise IncompleteStoreError(
                f"{os.path.join(path, MANIFEST)}: the store is incomplete ({manifest['total_rows']} rows in "
                f"{len(manifest['shards'])} shards; its writer was not closed). Fix: resume it with StoreWriter "
                "and the same settings, or pass allow_incomplete=True to read the finished shards.")
        return cls(path, manifest)

    def __len__(self) -> int:
        return self.manifest["total_rows"]

    def __repr__(self) -> str:
        return (f"Store({self.path!r}, rows={len(self)}, width={self.width}, dtype={self.manifest['dtype']}, "
                f"shards={len(self.shards)}, blocks={len(self.layout)})")

    @property
    def ids(self) -> list:
        """All example ids in row order (reads ids files when there are any)."""
        return [i for info in self.shards for i in _load_ids(self.path, info)]

    def content_key(self) -> str:
        """24 hex digits of sha256 over the fingerprint and every shard's sha256: names data derived from
        exactly these features (sidecar caches)."""
        digest = hashlib.sha256(self.fingerprint.encode())
        for info in self.shards:
            digest.update(info.sha256.encode())
        return digest.hexdigest()[:24]

    def sidecar_path(self, name: str) -> str:
        """Path of the sidecar file ``sidecar-<name>.safetensors`` in the store directory.

        Sidecars hold data derived from the features (e.g. cached self-influence);
        they are not part of the manifest, and ``StoreWriter(..., overwrite=True)``
        deletes them with the store.
        """
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise StoreError(f"sidecar name must be letters, digits, '_', '.' or '-', got {name!r}")
        return os.path.join(self.path, f"sidecar-{name}.safetensors")

    def check_fingerprint(self, fingerprint: str) -> None:
        """Raise :class:`StoreError` unless the store was written for ``fingerprint``."""
        if fingerprint != self.fingerprint:
            raise StoreError(f"{self.path}: the store holds features of model fingerprint {self.fingerprint!r}, "
                             f"not {fingerprint!r}. Fix: featurize this model into a new store.")

    def split(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split rows into the layout's blocks.

        Args:
            features: (..., width).

        Returns:
            name -> (..., *block.shape) views.
        """
        if features.shape[-1] != self.width:
            raise StoreError(f"features has {features.shape[-1]} columns, the store's layout has {self.width}")
        parts = torch.split(features, [b.width for b in self.layout], dim=-1)
        return {b.name: p.unflatten(-1, b.shape) for b, p in zip(self.layout, parts)}

    def verify(self) -> None:
        """Check every shard's header (dtype/shape vs manifest), size and sha256, and every ids file.

        Ids are also checked to be unique across the store.

        Raises:
            ShardError: listing every bad file (``.problems``).
        """
        problems: list[tuple[str, str]] = []
        seen: set = set()
        for info in self.shards:
            try:
                verify_shard(self.path, self._config, info)
                ids = _load_ids(self.path, info)
            except ShardError as exc:
                problems.extend(exc.problems)
                continue
            dupes = seen.intersection(ids)
            if dupes or len(set(ids)) != len(ids):
                problems.append((os.path.join(self.path, MANIFEST),
                                 f"shard {info.file} repeats example ids, e.g. {sorted(map(str, dupes))[:3]}"))
            seen.update(ids)
        if problems:
            raise ShardError(problems)

    def iter_shards(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, prefetch: int = 1,
                    *, verify: bool = True, extras: Sequence[str] = ()) -> Iterator[tuple]:
        """Stream the shards in order, one at a time.

        A background thread reads up to ``prefetch`` shards ahead (header check,
        sha256 when ``verify``), so about ``prefetch + 2`` shards are in memory
        at most (the one being read, the prefetched ones, and the previous one
        while the consumer's loop variable still holds it). For a CUDA ``device`` it reads into pinned memory and copies
        with ``non_blocking`` on a side stream; the consumer's current stream
        waits on that copy before the shard is yielded.

        Args:
            device: where ``features`` should live.
            dtype: convert features to this dtype (after the copy); None keeps
                the stored dtype.
            prefetch: shards to read ahead; 0 reads synchronously.
            verify: check each shard's sha256 while reading.
            extras: names of extra per-row tensors to yield as well.

        Yields:
            :class:`ShardChunk` ``(row_offset, features (rows, width), ids)``;
            with ``extras``, 4-tuples ``(row_offset, features, ids, {name: (rows, ...)})``.

        Raises:
            ShardError: a shard is missing, truncated, corrupt or foreign (names the file).
        """
        unknown = [n for n in extras if n not in self.extras]
        if unknown:
            raise StoreError(f"unknown extras {unknown}; the store holds {self.extras}")
        if not _is_int(prefetch) or prefetch < 0:
            raise StoreError(f"prefetch must be an int >= 0, got {prefetch!r}")
        device = torch.device(device)
        names = (FEATURES, *extras)
        transfer = _CudaTransfer(device, dtype) if device.type == "cuda" else _CpuTransfer(device, dtype)
        return self._stream(transfer, prefetch, verify, names)

    def _stream(self, transfer, prefetch: int, verify: bool, names: tuple[str, ...]) -> Iterator[tuple]:
        extras = names[1:]

        def load(info: ShardInfo):
            shard = _load_shard(self.path, self._config, info, verify=verify, pin=transfer.pin, names=names)
            return info, transfer.send(shard.tensors), _load_ids(self.path, info)

        items = _prefetched(load, self.shards, prefetch) if prefetch else map(load, self.shards)
        for info, tensors, ids in items:
            tensors = transfer.receive(tensors)
            chunk = ShardChunk(info.row_start, tensors[FEATURES], ids)
            yield chunk if not extras else (*chunk, {n: tensors[n] for n in extras})

    def read_rows(self, indices: Sequence[int] | torch.Tensor, dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, list]:
        """Read a few rows by global index, touching only those bytes (no sha256 check).

        Args:
            indices: row indices in ``[0, len(store))``.
            dtype: convert to this dtype; None keeps the stored dtype.

        Returns:
            (features (len(indices), width), ids) in the order asked.
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        n = len(self)
        bad = [i for i in indices if not _is_int(i) or not 0 <= i < n]
        if bad:
            raise StoreError(f"row indices out of range [0, {n}) or not ints: {bad[:5]}")
        out = torch.empty(len(indices), self.width, dtype=self.dtype)
        ids: list = [None] * len(indices)
        starts = [s.row_start for s in self.shards]
        by_shard: dict[int, list[int]] = {}
        for pos, row in enumerate(indices):
            by_shard.setdefault(bisect.bisect_right(starts, row) - 1, []).append(pos)
        row_bytes = self.width * out.element_size()
        for s, positions in by_shard.items():
            info = self.shards[s]
            path = os.path.join(self.path, info.file)
            shard_ids = _load_ids(self.path, info)
            with open(path, "rb", buffering=0) as f:
                header = read_header(path, f)
                _check_header_matches(path, header, self._config, info)
                base = header.data_start + header.tensors[FEATURES][2][0]
                for pos in positions:
                    local = indices[pos] - info.row_start
                    f.seek(base + local * row_bytes)
                    _readinto_all(f, out[pos].view(torch.uint8), path)
                    ids[pos] = shard_ids[local]
        return (out if dtype is None else out.to(dtype)), ids


class _CpuTransfer:
    pin = False

    def __init__(self, device: torch.device, dtype: torch.dtype | None):
        self.device, self.dtype = device, dtype

    def send(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {n: t.to(self.device) for n, t in tensors.items()}
        if self.dtype is not None:
            out[FEATURES] = out[FEATURES].to(self.dtype)
        return out

    def receive(self, tensors):
        return tensors


class _CudaTransfer:
    """Pinned host buffers, copied with non_blocking on a side stream; the consumer waits on an event."""

    pin = True

    def __init__(self, device: torch.device, dtype: torch.dtype | None):
        if not torch.cuda.is_available():
            raise StoreError(f"device {device} requested but torch.cuda.is_available() is False")
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.dtype = dtype
        self.stream = torch.cuda.Stream(self.device)

    def send(self, tensors: dict[str, torch.Tensor]):
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            out = {n: t.to(self.device, non_blocking=True) for n, t in tensors.items()}
            if self.dtype is not None:
                out[FEATURES] = out[FEATURES].to(self.dtype)
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def receive(self, sent):
        tensors, event = sent
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors.values():
            t.record_stream(current)  # allocated on the side stream, used on the current one
        return tensors


_DONE = object()


def _prefetched(load, items: Sequence, prefetch: int) -> Iterator:
    """``map(load, items)`` computed by a background thread at most ``prefetch`` items ahead.

    The thread runs at most ``prefetch`` items ahead of the item the consumer
    holds; while ``next()`` runs, the consumer usually still references its
    previous item too, so up to ``prefetch + 2`` items are alive at a time.
    Exceptions in ``load`` are re-raised in the consumer; closing the
    generator early stops the thread.
    """
    results: queue.Queue = queue.Queue()
    slots = threading.Semaphore(prefetch + 1)
    stop = threading.Event()

    def worker():
        try:
            for item in items:
                while not slots.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                results.put((True, load(item)))
            results.put((True, _DONE))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            results.put((False, exc))

    thread = threading.Thread(target=worker, name="airtrace-store-prefetch", daemon=True)
    thread.start()
    try:
        first = True
        while True:
            ok, value = results.get()
            if not first:
                slots.release()  # the previously yielded item is done with
            first = False
            if not ok:
                raise value
            if value is _DONE:
                return
            yield value
    finally:
        stop.set()
        thread.join()


# ----------------------------------------------------------------------------- lock


class StoreLock:
    """Exclusive write lock of a store directory: ``<dir>/writer.lock`` holding the owner's pid and host.

    The lock is an flock(2) on the open file, so the kernel releases it when
    the owner dies, even by SIGKILL; the file is then stale (it names a dead
    owner) and the next :meth:`acquire` takes it over with a warning. Two
    lock objects conflict even within one process. :meth:`release` deletes
    the file, so a finished store holds no lock file.

    Example::

        with StoreLock(path):       # anything that writes files into the store directory
            ...

    Attributes:
        path: the lock file.
        recovered: the owner record of a stale lock taken over by :meth:`acquire`, else None.
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = os.path.join(os.fspath(directory), LOCK)
        self.recovered: dict | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> StoreLock:
        """Take the lock, or raise :class:`StoreLockedError` naming the file and the owner pid.

        Raises:
            StoreLockedError: a live writer holds it.
            StoreError: the lock file cannot be created (names the file).
        """
        if self._fd is not None:
            raise StoreError(f"{self.path}: this lock is already held")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot create the store lock file ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = _read_lock_owner(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreLockedError(self.path, owner) from None
                raise StoreError(f"{self.path}: cannot lock the store ({exc.strerror}); the file system must "
                                 "support flock(2)") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its previous owner deleted it between our open and flock: lock the new file
        previous = _read_lock_owner(fd)
        if previous:
            self.recovered = previous
            log.warning("airtrace store: recovered the stale lock %s of pid %s on host %s, which is no longer "
                        "running", self.path, previous.get("pid", "?"), previous.get("host", "?"))
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Delete the lock file and unlock; idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        finally:
            os.close(fd)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        st_fd, st_path = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st_fd.st_dev, st_fd.st_ino) == (st_path.st_dev, st_path.st_ino)


def _read_lock_owner(fd: int) -> dict:
    """The owner record of a lock file ({} when empty or unreadable)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return owner if isinstance(owner, dict) else {}


# ----------------------------------------------------------------------------- writer


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
        if not _is_int(rows_per_shard) or rows_per_shard < 1:
            raise StoreError(f"rows_per_shard must be a positive int, got {rows_per_shard!r}")
        blocks = normalize_layout(layout)
        self._config = {
            "fingerprint": fingerprint,
            "layout": [b.to_json() for b in blocks],
            "width": sum(b.width for b in blocks),
            "dtype": dtype_name(dtype),
            "rows_per_shard": int(rows_per_shard),
            "extras": _normalize_extras(extras),
            "meta": _canonical_json(dict(meta or {}), "meta"),
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
            self.done_ids = [i for info in self._shards for i in _load_ids(self.path, info)]
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
            foreign = [n for n in names if not (_SHARD_RE.match(n) or _IDS_RE.match(n))]
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
        diffs = [(k, manifest[k], self._config[k]) for k in _CONFIG_KEYS if manifest[k] != self._config[k]]
        if diffs:
            raise StoreMismatchError(self.path, diffs)
        if manifest["complete"]:
            raise StoreCompleteError(self.path, manifest["total_rows"])
        self._shards = _shard_infos(manifest)
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
            if _TMP_RE.match(name):
                os.unlink(os.path.join(self.path, name))
                self.removed_files.append(name)

    def _remove_uncommitted(self, n_committed: int) -> None:
        """Delete shard / ids files the manifest does not (yet) list: they are rewritten identically."""
        for name in sorted(os.listdir(self.path)):
            m = _SHARD_RE.match(name) or _IDS_RE.match(name)
            if m and int(m.group(1)) >= n_committed:
                os.unlink(os.path.join(self.path, name))
                self.removed_files.append(name)

    def _remove_store_files(self) -> None:
        for name in sorted(os.listdir(self.path)):
            if (name == MANIFEST or _SHARD_RE.match(name) or _IDS_RE.match(name) or _TMP_RE.match(name)
                    or _SIDECAR_RE.match(name)):
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
        self._check_finite(features, ids)
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

    def _check_finite(self, features: torch.Tensor, ids: list) -> None:
        if self.check_finite and features.numel() and not _all_finite(features):
            row = int((~torch.isfinite(features)).any(dim=1).nonzero()[0])
            raise StoreError(f"features row {row} of this batch has NaN/Inf values (example id {ids[row]!r}); "
                             "nothing from this batch was written")

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
                                   encode_shard(tensors, _shard_metadata(index, row_start)))
        return ShardInfo(index, file, row_start, row_start + rows, nbytes, sha,
                         None if ids_file else ids, ids_file, ids_sha)

    def _write_manifest(self, *, complete: bool) -> None:
        manifest = _manifest_dict(self._config, self._shards, complete)
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


# ----------------------------------------------------------------------------- fingerprint


def model_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 1024) -> str:
    """A stable identity of a model's weights.

    sha256 over every parameter's name, shape, dtype and ``samples_per_tensor``
    values taken at an even stride through the flattened tensor (bytes as
    stored). Same weights on any device give the same fingerprint; it changes
    with a different architecture, dtype or (almost surely) any training step.

    Args:
        model: the module.
        samples_per_tensor: values sampled per parameter.

    Returns:
        ``"sha256:<64 hex digits>"``.
    """
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu").contiguous()
        digest.update(json.dumps([name, list(p.shape), str(p.dtype)]).encode())
        digest.update(_tensor_bytes(sample).tobytes())
    return "sha256:" + digest.hexdigest()


__all__ = [
    "Block",
    "IncompleteStoreError",
    "StoreCompleteError",
    "LOCK",
    "ManifestError",
    "ShardChunk",
    "ShardError",
    "ShardInfo",
    "Store",
    "StoreError",
    "StoreLock",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreWriter",
    "atomic_write",
    "load_manifest",
    "model_fingerprint",
    "normalize_layout",
    "read_header",
    "verify_shard",
]
