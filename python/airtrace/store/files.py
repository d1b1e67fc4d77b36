"""Low-level store files: atomic writes, sha256, JSON from untrusted bytes, and deterministic safetensors encoding and
bounds-checked header parsing; imports ``airtrace.store.errors`` and ``.format``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from airtrace.store.errors import ShardError
from airtrace.store.format import EXTRA_DTYPES, MAX_HEADER_BYTES, ST_CODE, ST_ITEMSIZE, dtype_name, is_int


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


def parse_json(raw: bytes) -> Any:
    """``json.loads`` of UTF-8 bytes; every way it can fail on hostile input becomes a ValueError.

    Besides malformed JSON, that is invalid UTF-8, integers longer than Python's
    digit limit, and nesting deeper than the recursion limit.
    """
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
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
        header[name] = {"dtype": ST_CODE[dtype_name(t.dtype, EXTRA_DTYPES)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return [struct.pack("<Q", len(raw)) + raw] + [tensor_bytes(tensors[n]) for n in order]


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
        header = parse_json(raw)
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
    if not isinstance(code, str) or code not in ST_ITEMSIZE:
        raise bad(f"tensor {name!r} has unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(is_int(s) and s >= 0 for s in shape):
        raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * ST_ITEMSIZE[code]
    if nbytes != offsets[1] - offsets[0]:
        raise bad(f"header claims absurd sizes: tensor {name!r} of shape {shape} needs {nbytes} bytes "
                  f"but its data_offsets span {offsets[1] - offsets[0]}")
    if offsets[1] > data_len:
        raise bad(f"truncated or absurd header: tensor {name!r} ends at data byte {offsets[1]} "
                  f"but the file holds {data_len}")
    return code, tuple(shape), (offsets[0], offsets[1])
