"""Hostile inputs: each gives a clear error naming the file or argument, and nothing valid is lost.

tests/test_store.py already covers a truncated shard, a flipped byte and a
foreign file while verifying / streaming, a header length beyond the 100 MiB
limit, a shape x dtype that differs from the byte range, a shard swapped with
another, and manifests with a wrong width, row ranges or id count. This file
covers the rest.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from airtrace import Attributor
from airtrace.capture import per_example_loss
from airtrace.scoring import stream_scores
from airtrace.store import (
    IDS_FMT,
    ManifestError,
    ShardError,
    Store,
    StoreError,
    StoreMismatchError,
    StoreWriter,
)

FP = "sha256:" + "ef" * 32
LAYOUT = [("a", (2, 3)), ("b", 2)]  # width 8


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def _files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def _interrupted(path: Path, n: int = 10, rows_per_shard: int = 3) -> dict[str, bytes]:
    """A store whose writer was killed after n rows (n // rows_per_shard shards committed); its files."""
    w = StoreWriter(path, FP, LAYOUT, "float32", rows_per_shard)
    w.append(_rows(n), [f"x{i}" for i in range(n)])
    w.abort()
    return _files(path)


def _put_manifest(store_path: Path, change) -> None:
    mpath = store_path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    change(manifest)
    mpath.write_text(json.dumps(manifest))


@pytest.fixture
def store(tmp_path) -> Store:
    with StoreWriter(tmp_path / "s", FP, LAYOUT, "float32", 3) as w:
        w.append(_rows(7), [f"x{i}" for i in range(7)])
    return Store.open(tmp_path / "s")


# ----------------------------------------------------------------------------- shards during a resume


def test_truncated_shard_fails_the_resume_and_nothing_is_deleted(tmp_path):
    path = tmp_path / "s"
    before = _interrupted(path)
    shard = path / "shard-00001.safetensors"
    shard.write_bytes(before["shard-00001.safetensors"][:-9])
    damaged = _files(path)
    with pytest.raises(ShardError, match=r"shard-00001\.safetensors: truncated") as info:
        StoreWriter(path, FP, LAYOUT, "float32", 3)
    assert info.value.path == str(shard) and "repair=True" in str(info.value)
    assert _files(path) == damaged  # the finished shards 0 and 2 and the manifest are untouched


def test_flipped_byte_in_an_ids_file(tmp_path, monkeypatch):
    monkeypatch.setattr("airtrace.store.writer.IDS_INLINE_MAX", 2)  # shards of 3 rows keep their ids in a file
    path = tmp_path / "s"
    _interrupted(path)
    ids_file = path / IDS_FMT.format(1)
    data = bytearray(ids_file.read_bytes())
    data[3] ^= 0x01
    ids_file.write_bytes(bytes(data))
    store = Store.open(path, allow_incomplete=True)
    with pytest.raises(ShardError, match=r"shard-00001\.ids\.json: sha256 mismatch"):
        store.verify()
    with pytest.raises(ShardError, match=r"shard-00001\.ids\.json: sha256 mismatch"):
        _ = store.ids
    with pytest.raises(ShardError, match=r"shard-00001\.ids\.json"):
        StoreWriter(path, FP, LAYOUT, "float32", 3)


def test_shards_without_a_manifest_are_not_deleted(tmp_path):
    path = tmp_path / "s"
    before = _interrupted(path)
    (path / "manifest.json").unlink()
    with pytest.raises(StoreError, match=r"holds shard files .* but no manifest\.json.*overwrite=True"):
        StoreWriter(path, FP, LAYOUT, "float32", 3)
    assert _files(path) == {n: b for n, b in before.items() if n != "manifest.json"}


# ----------------------------------------------------------------------------- safetensors headers


def _rewrite_header(path: Path, change) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def test_header_length_beyond_the_file(store):
    path = Path(store.path) / "shard-00000.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 10 * size))  # under the 100 MiB limit, past the end of the file
    with pytest.raises(ShardError, match=rf"shard-00000\.safetensors: truncated: header claims {10 * size} bytes"):
        store.verify()


def test_tensor_offsets_past_the_end(store):
    path = Path(store.path) / "shard-00000.safetensors"

    def past_the_end(header):
        begin, end = header["features"]["data_offsets"]
        header["features"]["shape"] = [3, 8 + 2**20]
        header["features"]["data_offsets"] = [begin, begin + 3 * (8 + 2**20) * 4]

    _rewrite_header(path, past_the_end)
    with pytest.raises(ShardError, match=r"shard-00000\.safetensors: truncated or absurd header: tensor 'features' "
                                         r"ends at data byte"):
        store.verify()
    with pytest.raises(ShardError, match=r"shard-00000\.safetensors"):
        store.read_rows([0])


def test_header_with_a_non_string_dtype(store):
    path = Path(store.path) / "shard-00002.safetensors"
    _rewrite_header(path, lambda header: header["features"].update(dtype=["F32"]))
    with pytest.raises(ShardError, match=r"shard-00002\.safetensors: tensor 'features' has unknown dtype \['F32'\]"):
        list(store.iter_shards())


# ----------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(dtype="int8"), r"invalid layout/dtype/extras: dtype must be one of"),
    (lambda m: m.update(dtype="float64"), r"invalid layout/dtype/extras: dtype must be one of"),
    (lambda m: m["shards"][2]["ids"].__setitem__(0, "x1"),
     r"example id 'x1' repeats \(shards\[0\]\.ids\[1\] and shards\[2\]\.ids\[0\]\)"),
    (lambda m: m["shards"][1]["ids"].__setitem__(2, "x3"), r"example id 'x3' repeats"),
    (lambda m: m.update(total_rows=8), r"total_rows is 8 but the shards hold 7 rows"),
    (lambda m: m["shards"][2].update(ids=["x6", "x7"]), r"shards\[2\]\.ids: ids has 2 entries but features has 1"),
    (lambda m: m["shards"][0].update(row_start=False), r"shards\[0\]\.row_start is False"),
    (lambda m: m.update(layout=[{"name": "a", "width": 6, "shape": [2, "3"]}, {"name": "b", "width": 2}]),
     r"shape must be a list of positive ints"),
])
def test_manifest_with_wrong_dtypes_or_ids(store, change, message):
    _put_manifest(Path(store.path), change)
    with pytest.raises(ManifestError, match=message) as info:
        Store.open(store.path)
    assert str(info.value).startswith(os.path.join(store.path, "manifest.json") + ": ")


def test_a_resume_refuses_a_bad_manifest_and_keeps_the_shards(tmp_path):
    path = tmp_path / "s"
    _interrupted(path)
    _put_manifest(path, lambda m: m["shards"][1]["ids"].__setitem__(0, "x0"))
    damaged = _files(path)
    with pytest.raises(ManifestError, match="example id 'x0' repeats"):
        StoreWriter(path, FP, LAYOUT, "float32", 3)
    assert _files(path) == damaged


# ----------------------------------------------------------------------------- through the Attributor


def _loss(model, batch):
    return per_example_loss(model(batch["x"]), batch["y"])


def _task(seed: int = 0, n: int = 12):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    X, y = torch.randn(n, 5), torch.randint(3, (n,))
    batches = [([f"t{i}" for i in range(s, min(s + 4, n))], {"x": X[s: s + 4], "y": y[s: s + 4]})
               for s in range(0, n, 4)]
    return model, batches


def _attributor(model, curvature="identity"):
    return Attributor(model, "*", loss_fn=_loss, projection=dict(k_in=2, k_out=2, seed=1, exact_budget=0),
                      curvature=curvature)


def test_a_store_of_another_model_is_refused_everywhere(tmp_path):
    model, train = _task(0)
    other, _ = _task(1)
    path = tmp_path / "s"
    _attributor(model).featurize(train, path, rows_per_shard=4, progress=False)
    before = _files(path)
    at = _attributor(other, curvature="ekfac")
    with pytest.raises(StoreError, match=rf"{path}: the store holds features of model fingerprint 'fp2:"):
        at.fit(train, store=path, progress=False)
    with pytest.raises(StoreError, match=rf"{path}: the store holds features of model fingerprint"):
        _attributor(other).score(train[:1], path, progress=False)
    with pytest.raises(StoreMismatchError, match=rf"{path}: cannot resume.*\(fingerprint\)"):
        _attributor(other).featurize(train, path, rows_per_shard=4, progress=False)
    assert _files(path) == before  # the refused writer changed nothing (the store was complete anyway)


def test_nan_gradients_stop_featurize_and_the_store_resumes(tmp_path):
    model, train = _task(0)
    path = tmp_path / "s"
    poisoned = [train[0], (train[1][0], {**train[1][1], "x": train[1][1]["x"].clone()}), train[2]]
    poisoned[1][1]["x"][2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer '0': non-finite \(NaN/Inf\)"):
        _attributor(model).featurize(poisoned, path, rows_per_shard=4, progress=False)
    partial = Store.open(path, allow_incomplete=True)
    partial.verify()
    assert partial.ids == ["t0", "t1", "t2", "t3"] and not (path / "writer.lock").exists()
    _attributor(model).featurize(train, path, rows_per_shard=4, progress=False)  # resumes with clean data
    reference = _attributor(model).featurize(train, tmp_path / "ref", rows_per_shard=4, progress=False)
    assert _files(path) == _files(Path(reference.path))


def test_inf_features_name_the_example(tmp_path):
    w = StoreWriter(tmp_path / "s", FP, LAYOUT, "float32", 3)
    bad = _rows(4)
    bad[2, 5] = float("inf")
    with pytest.raises(StoreError, match=r"features row 2 of this batch has NaN/Inf values \(example id 'c'\)"):
        w.append(bad, ["a", "b", "c", "d"])
    assert w.rows_written == 0


def test_empty_dataset(tmp_path):
    model, train = _task(0)
    store = _attributor(model).featurize([], tmp_path / "s", progress=False)
    assert len(store) == 0 and store.complete and store.ids == []
    store.verify()
    with pytest.raises(StoreError, match=rf"{tmp_path / 's'}: the store holds no rows"):
        _attributor(model, curvature="fisher").fit(store=store, progress=False)
    with pytest.raises(ValueError, match=r"from Attributor\.fit: its batches yielded no examples"):
        _attributor(model, curvature="kfac").fit([], progress=False)
    scores = _attributor(model).score(train[:1], store, topk=2, progress=False)
    assert scores.indices.eq(-1).all() and scores.values.eq(float("-inf")).all() and scores.ids[0] == [None, None]
    with pytest.raises(ValueError, match="query_batches yielded no examples"):
        _attributor(model).score([], store, progress=False)


class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(11, 6), nn.Linear(6, 11)

    def forward(self, input_ids):
        return self.out(torch.tanh(self.emb(input_ids)))


def _lm_loss(model, batch):
    return per_example_loss(model(batch["input_ids"]), batch["labels"], task="causal_lm")


def test_zero_length_sequences_give_zero_features(tmp_path):
    torch.manual_seed(0)
    model = _TinyLM()
    ids = torch.randint(11, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1] = 0  # example "b" is all padding
    mask[2, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    at = Attributor(model, "*", loss_fn=_lm_loss, projection=dict(k_in=3, k_out=2), curvature="identity")
    store = at.featurize([(["a", "b", "c"], batch)], tmp_path / "s", dtype="float32", progress=False)
    X, _ = store.read_rows([0, 1, 2])
    assert X[1].eq(0).all() and X[0].abs().sum() > 0 and X[2].abs().sum() > 0
    alone = {key: value[[0, 2]] for key, value in batch.items()}
    torch.testing.assert_close(X[[0, 2]], at.features(alone))  # the padded example changes nothing else
    empty = {key: value[:, :0] for key, value in batch.items()}  # T = 0: every example is zero-length
    assert at.features(empty).eq(0).all()
    for metric in ("inner", "cosine"):
        scores = at.score([(["qa", "qc"], alone)], store, topk=3, metric=metric, progress=False)
        assert scores.values.isfinite().all()
        assert scores.values[scores.indices == 1].tolist() == [0.0, 0.0]  # "b" scores 0, not NaN


def test_queries_whose_dims_do_not_match_the_store(tmp_path):
    model, train = _task(0)
    store = _attributor(model).featurize(train, tmp_path / "s", progress=False)
    other = Attributor(model, "*", loss_fn=_loss, projection=dict(k_in=3, k_out=2, seed=1, exact_budget=0))
    with pytest.raises(StoreError, match=rf"{tmp_path / 's'}: the store was featurized with projection"):
        other.score(train[:1], store, progress=False)
    with pytest.raises(ValueError, match=rf"Q must be \(q, 8\) to match the rows of the store {tmp_path / 's'}, "
                                         r"got \(2, 7\)"):
        stream_scores(torch.randn(2, 7), store, topk=3, progress=False)
    with pytest.raises(StoreError, match="features has 7 columns, the store's layout has 8"):
        store.split(torch.randn(2, 7))
