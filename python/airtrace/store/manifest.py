"""The store manifest (``manifest.json``): shard entries, deterministic text, its checksum, and full validation on
load; imports ``airtrace.store.errors``, ``.format``, ``.files`` and ``airtrace.util.fix``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from airtrace.store.errors import ManifestError, StoreError
from airtrace.store.files import parse_json
from airtrace.store.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IDS_FMT,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SHA_RE,
    SHARD_FMT,
    STORE_DTYPES,
    dtype_name,
    is_int,
    normalize_extras,
    normalize_ids,
    normalize_layout,
)
from airtrace.util.fix import with_fix


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


def manifest_dict(config: dict, shards: Sequence[ShardInfo], complete: bool) -> dict:
    """The manifest with its fixed key order, its checksum last."""
    manifest = {
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
    return {**manifest, "checksum": manifest_checksum(manifest)}


def manifest_checksum(manifest: Mapping) -> str:
    """sha256 hex of the manifest without its ``checksum`` (sorted compact JSON): covers the settings, the shard
    list and the inline ids."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


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


CONFIG_KEYS = ("fingerprint", "layout", "width", "dtype", "rows_per_shard", "extras", "meta")


def config_of(manifest: Mapping) -> dict:
    return {k: manifest[k] for k in CONFIG_KEYS}


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
            manifest = parse_json(f.read())
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
    if is_int(m.get("version")) and 1 <= m["version"] < FORMAT_VERSION:
        raise with_fix(bad(
            f"written by an older airtrace (store format {m['version']}), whose model fingerprint sampled a few "
            "parameter values only, so the store cannot be tied to its model; it needs re-featurizing. Fix: "
            "featurize again into a new directory, or with overwrite=True to replace it"),
            "run airtrace featurize again into a new directory, or with --overwrite to replace it.")
    if m.get("version") != FORMAT_VERSION:
        raise bad(f"version {m.get('version')!r} is not supported (this airtrace reads version {FORMAT_VERSION}); "
                  "upgrade airtrace or re-create the store")
    expected = ("format", "version", "complete") + CONFIG_KEYS + ("total_rows", "shards", "checksum")
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
        extras = normalize_extras({e["name"]: (e["dtype"], e["shape"]) for e in m["extras"]})
    except (StoreError, TypeError, KeyError) as exc:
        raise bad(f"invalid layout/dtype/extras: {exc}") from None
    if [b.to_json() for b in blocks] != m["layout"] or extras != m["extras"] or m["dtype"] not in STORE_DTYPES:
        raise bad("layout/dtype/extras are not in canonical form")
    width = sum(b.width for b in blocks)
    if m["width"] != width:
        raise bad(f"width is {m['width']!r} but the layout blocks sum to {width}; the manifest has wrong dims")
    if not is_int(m["rows_per_shard"]) or m["rows_per_shard"] < 1:
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
    if not is_int(m["total_rows"]) or m["total_rows"] != row:
        raise bad(f"total_rows is {m['total_rows']!r} but the shards hold {row} rows")
    if m["checksum"] != manifest_checksum(m):
        raise with_fix(bad(
            "checksum mismatch: the manifest changed after airtrace wrote it (an edited id or shard entry?), so its "
            "shard list and ids cannot be trusted. Fix: restore the original manifest.json, or featurize again with "
            "overwrite=True"), "restore the original manifest.json, or run airtrace featurize again with --overwrite.")


def _validate_shard_entry(bad, i: int, e: Any, row: int, rows_per_shard: int, last: bool, complete: bool) -> None:
    where = f"shards[{i}]"
    if not isinstance(e, dict):
        raise bad(f"{where} is not an object")
    for key in ("file", "row_start", "row_end", "bytes", "sha256"):
        if key not in e:
            raise bad(f"{where} has no {key!r}")
    if e["file"] != SHARD_FMT.format(i):
        raise bad(f"{where}.file is {e['file']!r}, expected {SHARD_FMT.format(i)!r}")
    if not is_int(e["row_start"]) or e["row_start"] != row:
        raise bad(f"{where}.row_start is {e['row_start']!r}, expected {row}: row ranges must be contiguous")
    if not is_int(e["row_end"]) or not row < e["row_end"] <= row + rows_per_shard:
        raise bad(f"{where}.row_end is {e['row_end']!r}, expected in ({row}, {row + rows_per_shard}]")
    rows = e["row_end"] - row
    if rows != rows_per_shard and not (last and complete):
        raise bad(f"{where} holds {rows} rows; only the last shard of a complete store may hold fewer "
                  f"than rows_per_shard={rows_per_shard}")
    if not is_int(e["bytes"]) or e["bytes"] < 8:
        raise bad(f"{where}.bytes must be an int >= 8, got {e['bytes']!r}")
    if not isinstance(e["sha256"], str) or not SHA_RE.match(e["sha256"]):
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
        if not isinstance(e.get("ids_sha256"), str) or not SHA_RE.match(e["ids_sha256"]):
            raise bad(f"{where}.ids_sha256 must be 64 lowercase hex digits")
    else:
        raise bad(f"{where} has neither ids nor ids_file")


def shard_infos(manifest: Mapping) -> list[ShardInfo]:
    return [
        ShardInfo(i, e["file"], e["row_start"], e["row_end"], e["bytes"], e["sha256"],
                  e.get("ids"), e.get("ids_file"), e.get("ids_sha256"))
        for i, e in enumerate(manifest["shards"])
    ]
