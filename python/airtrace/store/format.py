"""The store format: file names, limits, dtypes, the layout of a feature row, ids and extras, and what a shard holds;
imports only ``airtrace.store.errors``."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from airtrace.store.errors import StoreError


FORMAT_NAME = "airtrace-store"
FORMAT_VERSION = 2
"""2: the fingerprint covers every byte of the parameters and buffers and the module tree, and the manifest carries
its own checksum; 1 (older airtrace) sampled parameter values only."""
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

SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
IDS_RE = re.compile(r"^shard-(\d{5,})\.ids\.json$")
TMP_RE = re.compile(r"^(?:shard-\d{5,}\.(?:safetensors|ids\.json)|manifest\.json)\.\d+\.tmp$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")

MAX_ROWS_PER_SHARD = 4096
MAX_SHARD_BYTES = 128 * 2**20
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXTRA_DTYPES = {**STORE_DTYPES, "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "float": "float32", "f16": "float16", "fp64": "float64", "double": "float64"}
ST_CODE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64", "int32": "I32"}
ST_NAME = {code: name for name, code in ST_CODE.items()}
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


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
        width, shape = (size, None) if is_int(size) else (None, size)
    else:
        raise StoreError(f"layout block must be (name, width), (name, shape) or a dict, got {item!r}")
    if not isinstance(name, str) or not name:
        raise StoreError(f"layout block name must be a non-empty str, got {name!r}")
    if shape is not None:
        if not isinstance(shape, Sequence) or not shape or not all(is_int(s) and s > 0 for s in shape):
            raise StoreError(f"layout block {name!r}: shape must be a list of positive ints, got {shape!r}")
        shape = tuple(int(s) for s in shape)
        if width is None:
            width = math.prod(shape)
    if not is_int(width) or width < 1:
        raise StoreError(f"layout block {name!r}: width must be a positive int, got {width!r}")
    shape = shape or (int(width),)
    if math.prod(shape) != width:
        raise StoreError(f"layout block {name!r}: shape {list(shape)} has {math.prod(shape)} entries, width is {width}")
    return Block(name, int(width), shape)


def is_int(x: Any) -> bool:
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
        if is_int(i):
            out.append(int(i))
        elif isinstance(i, str):
            out.append(i)
        else:
            raise StoreError(f"ids must be str or int, got {i!r} ({type(i).__name__})")
    return out


def canonical_json(value: Any, what: str) -> Any:
    """JSON round trip with sorted keys: what the manifest stores and compares."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be JSON-serialisable (no NaN/Inf): {exc}") from None


def normalize_extras(extras: Any) -> list[dict]:
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
        if not all(is_int(s) and s > 0 for s in shape):
            raise StoreError(f"extra {name!r}: trailing shape must be positive ints, got {shape!r}")
        out.append({"name": name, "dtype": dtype_name(dtype, EXTRA_DTYPES), "shape": [int(s) for s in shape]})
    return out


def expected_tensors(config: Mapping, rows: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {FEATURES: (ST_CODE[config["dtype"]], (rows, config["width"]))}
    for e in config["extras"]:
        out[e["name"]] = (ST_CODE[e["dtype"]], (rows, *e["shape"]))
    return out


def shard_metadata(index: int, row_start: int) -> dict[str, str]:
    return {SHARD_METADATA_KEY: json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                            "shard": index, "row_start": row_start}, separators=(",", ":"))}
