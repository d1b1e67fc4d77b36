"""Fuzzing the manifest reader and the shard-header reader (hypothesis, bounded time).

Random and mutated inputs may parse or raise :class:`airtrace.StoreError`;
any other exception, a hang or a crash is a bug. The whole file runs in a
few seconds (max_examples per test below).
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from airtrace.store import MANIFEST, Store, StoreError, StoreWriter, load_manifest, read_header, verify_shard

FUZZ = settings(max_examples=150, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
DEEP = b"[" * 100_000 + b"]" * 100_000  # json's recursion limit
HUGE_INT = b'{"format": ' + b"9" * 5000 + b"}"  # int() digit limit


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid 2-shard store: its manifest (text, dict) and its shard 0 bytes."""
    root = tmp_path_factory.mktemp("fuzz")
    path = str(root / "good")
    with StoreWriter(path, "sha256:" + "cd" * 32, [("a", (2, 2)), ("b", 3)], "bfloat16", 3, {"k": 1},
                     extras={"loss": "float32"}) as w:
        w.append(torch.randn(5, 7), ["x", 1, "y", 2, "z"], loss=torch.arange(5.0))
    store = Store.open(path)
    with open(os.path.join(path, MANIFEST), "rb") as f:
        text = f.read()
    with open(os.path.join(path, store.shards[0].file), "rb") as f:
        shard = f.read()
    return _Good(str(root), text, shard, store)


class _Good(dict):
    """The fixture's files (a dict with a short repr, for hypothesis' failure reports)."""

    def __init__(self, root: str, manifest: bytes, shard: bytes, store: Store):
        super().__init__(root=root, manifest=manifest, shard=shard, store=store)

    def __repr__(self) -> str:
        return f"<store under {self['root']}>"


def _load_manifest_from(good, raw: bytes) -> None:
    """Write ``raw`` as a manifest next to good's shards and read it: parse or StoreError."""
    path = os.path.join(good["root"], "m")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, MANIFEST), "wb") as f:
        f.write(raw)
    try:
        manifest = load_manifest(path)
    except StoreError:
        return
    assert isinstance(manifest, dict)


def _read_shard(good, raw: bytes) -> None:
    """Write ``raw`` as shard 0 of the good store's config and check it: parse or StoreError."""
    path = os.path.join(good["root"], "s")
    os.makedirs(path, exist_ok=True)
    store = good["store"]
    info = store.shards[0]
    with open(os.path.join(path, info.file), "wb") as f:
        f.write(raw)
    try:
        header = read_header(os.path.join(path, info.file))
        assert header.data_start <= len(raw)
        for _, shape, (begin, end) in header.tensors.values():
            assert header.data_start + end <= len(raw) and begin <= end
        verify_shard(path, store._config, info)
    except StoreError:
        return


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 flips a byte, 1 inserts one, 2 deletes one."""
    out = bytearray(data)
    for kind, pos, value in edits:
        if not out:
            break
        pos %= len(out)
        if kind == 0:
            out[pos] ^= value or 1
        elif kind == 1:
            out.insert(pos, value)
        else:
            del out[pos]
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=6)


def _replace_at(value, path: list[int], new):
    """A copy of the JSON ``value`` with the node chosen by ``path`` replaced by ``new``."""
    if not path or not isinstance(value, (dict, list)) or not value:
        return new
    if isinstance(value, dict):
        key = sorted(value)[path[0] % len(value)]
        return {**value, key: _replace_at(value[key], path[1:], new)}
    i = path[0] % len(value)
    return value[:i] + [_replace_at(value[i], path[1:], new)] + value[i + 1:]


# ----------------------------------------------------------------------------- manifest


@FUZZ
@given(raw=st.binary(max_size=512))
@example(raw=DEEP)
@example(raw=HUGE_INT)
@example(raw=b"\xff\xfe{}")
def test_manifest_random_bytes(good, raw):
    _load_manifest_from(good, raw)


@FUZZ
@given(edits=EDITS)
def test_manifest_byte_mutations(good, edits):
    _load_manifest_from(good, _mutate(good["manifest"], edits))


@FUZZ
@given(path=st.lists(st.integers(0, 50), max_size=5), new=JSON)
@example(path=[5], new=[{"name": "a", "width": 4, "shape": [[2], 2]}])  # a layout shape of lists
@example(path=[8, 0, 4], new=False)  # a bool where an int belongs
def test_manifest_field_replacements(good, path, new):
    manifest = json.loads(good["manifest"])
    _load_manifest_from(good, json.dumps(_replace_at(manifest, path, new)).encode())


# ----------------------------------------------------------------------------- shard header


@FUZZ
@given(raw=st.binary(max_size=256))
@example(raw=struct.pack("<Q", 2**63) + b"{}")
@example(raw=struct.pack("<Q", len(DEEP)) + DEEP)
def test_shard_random_bytes(good, raw):
    _read_shard(good, raw)


@FUZZ
@given(edits=EDITS)
def test_shard_byte_mutations(good, edits):
    shard = good["shard"]
    n = struct.unpack("<Q", shard[:8])[0]
    # Concentrate the edits on the length prefix and the header.
    _read_shard(good, _mutate(shard[: 8 + n], edits) + shard[8 + n:])


@FUZZ
@given(path=st.lists(st.integers(0, 50), max_size=4), new=JSON)
@example(path=[1, 1], new=["F32"])  # an unhashable dtype
@example(path=[1, 0], new=[0, 2**64])  # offsets far past the end
def test_shard_header_field_replacements(good, path, new):
    shard = good["shard"]
    n = struct.unpack("<Q", shard[:8])[0]
    header = _replace_at(json.loads(shard[8: 8 + n]), path, new)
    text = json.dumps(header).encode()
    _read_shard(good, struct.pack("<Q", len(text)) + text + shard[8 + n:])
