"""Checks of shard and ids files against the manifest (header, dtypes, shapes, size, sha256); imports
``airtrace.store.errors``, ``.format``, ``.files`` and ``.manifest``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

from airtrace.store.errors import ShardError
from airtrace.store.files import ShardHeader, parse_json, read_header, sha256_file
from airtrace.store.format import ST_NAME, expected_tensors, normalize_ids, shard_metadata
from airtrace.store.manifest import ShardInfo


def check_header_matches(path: str, header: ShardHeader, config: Mapping, info: ShardInfo) -> None:
    """Header vs manifest: tensor names, dtypes, shapes, shard metadata."""
    expected = expected_tensors(config, info.rows)
    if set(header.tensors) != set(expected):
        raise ShardError([(path, f"foreign file: tensors {sorted(header.tensors)}, an airtrace shard holds "
                                 f"{sorted(expected)}")])
    for name, (code, shape) in expected.items():
        got_code, got_shape, _ = header.tensors[name]
        if (got_code, got_shape) != (code, shape):
            raise ShardError([(path, f"tensor {name!r} is {ST_NAME.get(got_code, got_code)} {list(got_shape)}, "
                                     f"the manifest says {ST_NAME[code]} {list(shape)}")])
    if header.metadata != shard_metadata(info.index, info.row_start):
        raise ShardError([(path, f"foreign or misplaced shard: metadata {header.metadata} does not mark it as "
                                 f"shard {info.index} starting at row {info.row_start}")])


def load_ids(root: str, info: ShardInfo) -> list:
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
        return normalize_ids(parse_json(raw), info.rows)
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
    check_header_matches(path, header, config, info)
    if size != info.nbytes:
        raise ShardError([(path, f"size is {size} bytes, the manifest says {info.nbytes}: truncated or replaced")])
    if sha256_file(path) != info.sha256:
        raise ShardError([(path, "sha256 mismatch: the content changed since it was written (flipped bytes?)")])
    load_ids(root, info)
