"""Feature store: round trip, streaming, crash/resume, hostile files."""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from airtrace.store import reader, writer
from airtrace.store.manifest import manifest_checksum
from airtrace.store import (
    IncompleteStoreError,
    ManifestError,
    ShardError,
    Store,
    StoreError,
    StoreMismatchError,
    StoreWriter,
    model_fingerprint,
)

LAYOUT = [("layer0", (2, 3)), ("layer1", 5)]  # width 11
WIDTH = 11
META = {"kind": "logra", "seeds": [1, 2], "dims": {"layer0": [2, 3], "layer1": [5]}}
FP = "sha256:" + "ab" * 32


def rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


def ids_for(n: int) -> list:
    return [f"ex{i}" if i % 3 else i for i in range(n)]  # mixed str / int ids


def write(path, feats, ids, *, dtype="float32", rows_per_shard=4, batch=3, fingerprint=FP, **kw) -> Store:
    with StoreWriter(path, fingerprint, LAYOUT, dtype, rows_per_shard, META, **kw) as w:
        for s in range(0, len(feats), batch):
            w.append(feats[s: s + batch], ids[s: s + batch])
    return Store.open(path)


def dir_bytes(path) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.fixture
def small_store(tmp_path):
    feats, ids = rows(10), ids_for(10)
    return write(tmp_path / "s", feats, ids), feats, ids


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_dtypes_partial_last_shard(tmp_path, dtype):
    feats, ids = rows(10), ids_for(10)
    store = write(tmp_path / "s", feats, ids, dtype=dtype)
    assert len(store) == 10 and store.dtype == dtype and store.width == WIDTH
    assert [s.rows for s in store.shards] == [4, 4, 2]
    assert sorted(os.listdir(store.path)) == ["manifest.json"] + [f"shard-0000{i}.safetensors" for i in range(3)]
    assert store.ids == ids and store.meta == json.loads(json.dumps(META))
    assert store.fingerprint == FP
    store.verify()
    got = torch.cat([c.features for c in store.iter_shards()])
    assert got.dtype == dtype and torch.equal(got, feats.to(dtype))
    # The files are plain safetensors.
    ref = load_file(os.path.join(store.path, "shard-00002.safetensors"))
    assert list(ref) == ["features"] and torch.equal(ref["features"], feats[8:].to(dtype))
    # Layout splits a row back into blocks.
    blocks = store.split(got)
    assert blocks["layer0"].shape == (10, 2, 3) and blocks["layer1"].shape == (10, 5)
    assert torch.equal(blocks["layer0"].reshape(10, 6), got[:, :6])


def test_manifest_contents(small_store):
    store, _, ids = small_store
    m = json.loads(open(os.path.join(store.path, "manifest.json")).read())
    assert list(m) == ["format", "version", "complete", "fingerprint", "layout", "width", "dtype",
                       "rows_per_shard", "extras", "meta", "total_rows", "shards", "checksum"]
    assert m["layout"] == [{"name": "layer0", "width": 6, "shape": [2, 3]},
                           {"name": "layer1", "width": 5, "shape": [5]}]
    assert m["complete"] and m["total_rows"] == 10 and m["rows_per_shard"] == 4
    assert [(s["row_start"], s["row_end"]) for s in m["shards"]] == [(0, 4), (4, 8), (8, 10)]
    assert m["shards"][0]["ids"] == ids[:4]
    for s in m["shards"]:
        assert s["bytes"] == os.path.getsize(os.path.join(store.path, s["file"]))


def test_ids_file_extras_and_default_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "IDS_INLINE_MAX", 3)
    feats = rows(9)
    si = torch.arange(9, dtype=torch.float32)
    with StoreWriter(tmp_path / "s", FP, LAYOUT, "bfloat16", 4, META, extras={"self_influence": "float32"}) as w:
        w.append(feats[:5], self_influence=si[:5])
        w.append(feats[5:], self_influence=si[5:])
    store = Store.open(tmp_path / "s")
    assert sorted(os.listdir(store.path))[:3] == ["manifest.json", "shard-00000.ids.json", "shard-00000.safetensors"]
    assert store.shards[2].ids == [8]  # 1 row: inline
    assert store.ids == list(range(9))
    store.verify()
    chunks = list(store.iter_shards(dtype=torch.float32, extras=["self_influence"]))
    assert torch.equal(torch.cat([c[3]["self_influence"] for c in chunks]), si)
    assert torch.equal(torch.cat([c[1] for c in chunks]), feats.bfloat16().float())


def test_read_rows(small_store):
    store, feats, ids = small_store
    idx = [9, 0, 5, 4, 5]
    got, got_ids = store.read_rows(idx)
    assert torch.equal(got, feats[idx]) and got_ids == [ids[i] for i in idx]
    with pytest.raises(StoreError, match="out of range"):
        store.read_rows([10])


def test_empty_store(tmp_path):
    StoreWriter(tmp_path / "s", FP, WIDTH, "float16", 4).close()
    store = Store.open(tmp_path / "s")
    assert len(store) == 0 and list(store.iter_shards()) == [] and store.ids == []


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_streaming_equals_whole_in_order(small_store, prefetch):
    store, feats, ids = small_store
    chunks = list(store.iter_shards(prefetch=prefetch, dtype=torch.float64))
    assert [c.row_offset for c in chunks] == [0, 4, 8]
    assert torch.equal(torch.cat([c.features for c in chunks]), feats.double())
    assert sum((c.ids for c in chunks), []) == ids


def test_prefetch_reads_ahead_but_bounded(tmp_path, monkeypatch):
    feats = rows(40)
    store = write(tmp_path / "s", feats, list(range(40)), rows_per_shard=4, batch=40)
    loaded, lock = [], threading.Lock()
    real = reader._load_shard

    def spy(root, config, info, **kw):
        with lock:
            loaded.append(info.index)
        return real(root, config, info, **kw)

    monkeypatch.setattr(reader, "_load_shard", spy)
    it = store.iter_shards(prefetch=2)
    seen = []
    for chunk in it:
        seen.append(chunk.row_offset // 4)
        with lock:
            assert len(loaded) <= len(seen) + 2  # never more than `prefetch` shards ahead
    assert seen == list(range(10)) and loaded == list(range(10))


def test_prefetch_early_break_and_error_propagates(small_store):
    store, _, _ = small_store
    it = store.iter_shards(prefetch=2)
    next(it)
    it.close()  # stops the worker thread
    assert not [t for t in threading.enumerate() if t.name == "airtrace-store-prefetch"]
    os.remove(os.path.join(store.path, "shard-00001.safetensors"))
    it = store.iter_shards(prefetch=1)
    assert next(it).row_offset == 0
    with pytest.raises(ShardError, match="shard-00001.safetensors: missing"):
        next(it)


def test_iter_shards_validates_args_eagerly(small_store):
    store, _, _ = small_store
    with pytest.raises(StoreError, match="unknown extras"):
        store.iter_shards(extras=["nope"])
    with pytest.raises(StoreError, match="prefetch"):
        store.iter_shards(prefetch=-1)


# ----------------------------------------------------------------------------- resume


def test_resume_after_kill_is_byte_identical(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "IDS_INLINE_MAX", 3)  # exercise ids files too
    feats, ids = rows(22), ids_for(22)
    ref = write(tmp_path / "ref", feats, ids, dtype="bfloat16", rows_per_shard=5, batch=4)

    path = tmp_path / "run"
    w = StoreWriter(path, FP, LAYOUT, "bfloat16", 5, META)
    w.append(feats[:7], ids[:7])
    w.append(feats[7:13], ids[7:13])  # 2 shards flushed, 3 rows buffered
    del w  # killed: no close()
    (path / "shard-00002.safetensors.4242.tmp").write_bytes(b"half a shard")
    (path / "manifest.json.4242.tmp").write_bytes(b"{")
    (path / "shard-00002.ids.json").write_bytes(b"[1,2")  # written just before the kill, never committed
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        Store.open(path)
    assert len(Store.open(path, allow_incomplete=True)) == 10

    w = StoreWriter(path, FP, LAYOUT, "bfloat16", 5, META)
    assert w.rows_done == 10 and w.done_ids == ids[:10]
    assert sorted(w.removed_files) == ["manifest.json.4242.tmp", "shard-00002.ids.json",
                                       "shard-00002.safetensors.4242.tmp"]
    with pytest.raises(StoreError, match="already in the store"):
        w.append(feats[9:11], ids[9:11])
    done = set(w.done_ids)
    for s in range(0, 22, 6):  # different batching than the reference run
        keep = [j for j in range(s, min(s + 6, 22)) if ids[j] not in done]
        w.append(feats[keep], [ids[j] for j in keep])
    w.close()
    assert dir_bytes(path) == dir_bytes(ref.path)


def test_resume_with_no_shards_and_complete_store(tmp_path):
    feats, ids = rows(6), ids_for(6)
    ref = write(tmp_path / "ref", feats, ids)
    w = StoreWriter(tmp_path / "run", FP, LAYOUT, "float32", 4, META)
    w.append(feats[:2], ids[:2])  # killed before the first shard
    del w
    w = StoreWriter(tmp_path / "run", FP, LAYOUT, "float32", 4, META)
    assert w.rows_done == 0 and w.done_ids == []
    w.append(feats, ids)
    w.close()
    assert dir_bytes(tmp_path / "run") == dir_bytes(ref.path)
    with pytest.raises(StoreError, match="already complete"):
        StoreWriter(tmp_path / "run", FP, LAYOUT, "float32", 4, META)
    w = StoreWriter(tmp_path / "run", FP, LAYOUT, "float32", 4, META, overwrite=True)
    assert w.rows_done == 0


def test_resume_mismatch_names_fields(tmp_path):
    w = StoreWriter(tmp_path / "s", FP, LAYOUT, "float32", 4, META)
    w.append(rows(5), ids_for(5))
    del w
    with pytest.raises(StoreMismatchError, match="fingerprint") as info:
        StoreWriter(tmp_path / "s", "sha256:other", LAYOUT, "float32", 4, META)
    assert info.value.fields == ["fingerprint"] and "sha256:other" in str(info.value)
    with pytest.raises(StoreMismatchError) as info:
        StoreWriter(tmp_path / "s", FP, [("layer0", 6), ("layer1", 6)], "float16", 4, META)
    assert info.value.fields == ["layout", "width", "dtype"]
    with pytest.raises(StoreMismatchError, match="meta"):
        StoreWriter(tmp_path / "s", FP, LAYOUT, "float32", 4, {**META, "seeds": [3]})


def test_resume_refuses_corrupt_shard_unless_repair(tmp_path):
    feats, ids = rows(13), ids_for(13)
    ref = write(tmp_path / "ref", feats, ids)
    w = StoreWriter(tmp_path / "run", FP, LAYOUT, "float32", 4, META)
    w.append(feats[:12], ids[:12])
    del w
    shard1 = tmp_path / "run" / "shard-00001.safetensors"
    data = bytearray(shard1.read_bytes())
    data[-1] ^= 0xFF
    shard1.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00001.safetensors: sha256 mismatch"):
        StoreWriter(tmp_path / "run", FP, LAYOUT, "float32", 4, META)
    w = StoreWriter(tmp_path / "run", FP, LAYOUT, "float32", 4, META, repair=True)
    assert w.rows_done == 4
    w.append(feats[4:], ids[4:])
    w.close()
    assert dir_bytes(tmp_path / "run") == dir_bytes(ref.path)


def test_writer_input_errors(tmp_path):
    w = StoreWriter(tmp_path / "s", FP, LAYOUT, "float32", 4, META)
    with pytest.raises(StoreError, match=r"\(B, 11\)"):
        w.append(torch.zeros(2, 10), [0, 1])
    with pytest.raises(StoreError, match="NaN/Inf"):
        w.append(torch.full((2, WIDTH), float("nan")), [0, 1])
    bad = torch.zeros(3, WIDTH)
    bad[1, 4] = -float("inf")
    with pytest.raises(StoreError, match="row 1 of this batch has NaN/Inf"):
        w.append(bad, [0, 1, 2])
    w.append(torch.zeros(0, WIDTH), [])  # no-op
    assert w.rows_written == 0
    with pytest.raises(StoreError, match="2 entries but features has 3"):
        w.append(torch.zeros(3, WIDTH), [0, 1])
    with pytest.raises(StoreError, match="repeat"):
        w.append(torch.zeros(2, WIDTH), [1, 1])
    with pytest.raises(StoreError, match="dtype"):
        StoreWriter(tmp_path / "t", FP, LAYOUT, "int8", 4)
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and not an airtrace store"):
        StoreWriter(tmp_path / "u", FP, LAYOUT)


# ----------------------------------------------------------------------------- hostile files


def _shard(store, i=1):
    return os.path.join(store.path, f"shard-0000{i}.safetensors")


def _expect_shard_error(store, fragment):
    with pytest.raises(ShardError) as info:
        store.verify()
    assert info.value.path == _shard(store) and fragment in str(info.value)
    assert _shard(store) in str(info.value)
    with pytest.raises(ShardError, match=fragment):  # streaming detects it too
        list(store.iter_shards())


def test_truncated_shard(small_store):
    store, _, _ = small_store
    path = _shard(store)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    _expect_shard_error(store, "truncated")


def test_flipped_byte(small_store):
    store, _, _ = small_store
    path = _shard(store)
    data = bytearray(open(path, "rb").read())
    data[len(data) - 7] ^= 0x01
    open(path, "wb").write(bytes(data))
    _expect_shard_error(store, "sha256 mismatch")


def test_foreign_files(small_store):
    store, _, _ = small_store
    open(_shard(store), "wb").write(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    _expect_shard_error(store, "not a")
    save_file({"weight": torch.zeros(4, WIDTH)}, _shard(store))
    _expect_shard_error(store, "foreign file")


def test_absurd_header_sizes(small_store):
    store, _, _ = small_store
    path = _shard(store)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 2**60))
    _expect_shard_error(store, "header claims")
    header = json.dumps({"features": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 176]}})
    blob = struct.pack("<Q", len(header)) + header.encode()
    open(path, "wb").write(blob + b"\0" * (size - len(blob)))
    _expect_shard_error(store, "absurd sizes")


def test_shard_swapped_with_another(small_store):
    store, _, _ = small_store
    data = open(_shard(store, 0), "rb").read()
    open(_shard(store), "wb").write(data)  # same shape and size, wrong place
    _expect_shard_error(store, "misplaced shard")


def test_manifest_wrong_dims(small_store):
    store, _, _ = small_store
    mpath = os.path.join(store.path, "manifest.json")
    good = json.loads(open(mpath).read())

    def put(m):  # signed like a manifest that airtrace wrote: the checks below are not the checksum's
        open(mpath, "w").write(json.dumps({**m, "checksum": manifest_checksum(m)}))

    put({**good, "width": 12})
    with pytest.raises(ManifestError, match=r"manifest\.json: width is 12 but the layout blocks sum to 11"):
        Store.open(store.path)
    # Consistent manifest, but the shards hold another width: the shard check names the shard.
    layout = [{"name": "layer0", "width": 6, "shape": [2, 3]}, {"name": "layer1", "width": 6, "shape": [6]}]
    put({**good, "layout": layout, "width": 12})
    with pytest.raises(ShardError, match=r"shard-00000\.safetensors: tensor 'features' is float32 \[4, 11\], "
                                         r"the manifest says float32 \[4, 12\]"):
        Store.open(store.path).verify()
    put({**good, "dtype": "float16"})
    with pytest.raises(ShardError, match="shard-00000.safetensors: tensor 'features' is float32"):
        Store.open(store.path).verify()
    shards = [dict(s) for s in good["shards"]]
    shards[1]["row_start"] = 5
    put({**good, "shards": shards})
    with pytest.raises(ManifestError, match="contiguous"):
        Store.open(store.path)
    shards = [dict(s) for s in good["shards"]]
    shards[0]["ids"] = shards[0]["ids"][:3]
    put({**good, "shards": shards})
    with pytest.raises(ManifestError, match=r"shards\[0\].ids: ids has 3 entries"):
        Store.open(store.path)
    shards = [dict(s) for s in good["shards"]]
    shards[0]["file"] = "../../etc/passwd"
    put({**good, "shards": shards})
    with pytest.raises(ManifestError, match="expected 'shard-00000.safetensors'"):
        Store.open(store.path)
    open(mpath, "w").write("{not json")
    with pytest.raises(ManifestError, match="manifest.json: not valid JSON"):
        Store.open(store.path)


def test_verify_lists_every_bad_file(small_store):
    store, _, _ = small_store
    for i in (0, 2):
        with open(_shard(store, i), "r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(b"\x7f")
    with pytest.raises(ShardError) as info:
        store.verify()
    assert [p for p, _ in info.value.problems] == [_shard(store, 0), _shard(store, 2)]


# ----------------------------------------------------------------------------- fingerprint


def test_model_fingerprint():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(300, 40), torch.nn.Linear(40, 3))
    b = torch.nn.Sequential(torch.nn.Linear(300, 40), torch.nn.Linear(40, 3))
    b.load_state_dict(a.state_dict())
    fa = model_fingerprint(a)
    assert fa == model_fingerprint(b) and fa.startswith("fp2:") and len(fa) == 68
    with torch.no_grad():
        b[1].bias[0] += 1
    assert model_fingerprint(b) != fa
    assert model_fingerprint(a.to(torch.bfloat16)) != fa


def test_default_rows_per_shard_keeps_a_shard_within_its_byte_budget():
    from airtrace.store import MAX_SHARD_BYTES, default_rows_per_shard

    assert default_rows_per_shard(1024, "bfloat16") == 4096  # 8 MiB shards: the row cap decides
    assert default_rows_per_shard(204_800, torch.float32) == MAX_SHARD_BYTES // (204_800 * 4) == 163
    assert default_rows_per_shard(10**9, "float16") == 1
