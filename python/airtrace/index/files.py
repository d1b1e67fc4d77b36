"""An index's files beside its store (``sidecar-index-<type>-<metric>.faiss`` and its ``.json`` record, plus the
``.partial`` pair of an unfinished build): writing them crash-safely and reading them back checked; imports
``airtrace.store``.

The record names the store's content key (:meth:`airtrace.store.Store.content_key`), the
curvature digest (:func:`airtrace.scoring.curvature_digest`), the metric, the index settings,
the rows added, and the sha256 and size of the faiss file; an index is only ever used with the
store content, curvature and metric it was built from.
"""

from __future__ import annotations

import json
import os

from airtrace.store import StoreError, atomic_write
from airtrace.store.files import parse_json, sha256_file

FORMAT = "airtrace-index"
VERSION = 1


class IndexFileError(StoreError):
    """An index file is missing, damaged, or belongs to other data; the message names the file and the fix."""


def index_name(kind: str, metric: str, partial: bool = False) -> str:
    """Sidecar name of an index: ``index-<type>-<metric>`` (``.partial`` while unfinished)."""
    return f"index-{kind}-{metric}" + (".partial" if partial else "")


def faiss_module():
    """The ``faiss`` package, or an ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(f"the ANN index needs faiss: pip install faiss-cpu (or airtrace[index]) ({exc})") from None
    return faiss


def write_index(index, path: str, record: dict) -> dict:
    """Write a faiss index to ``path`` (temp file, fsync, rename) and then its record beside it.

    The record gets ``format``, ``version``, ``bytes`` and ``sha256`` of the faiss file; it is
    written last (atomically), so a record always describes a complete file.

    Returns:
        The record as written.
    """
    faiss = faiss_module()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    record = {"format": FORMAT, "version": VERSION, **record, "bytes": os.path.getsize(path),
              "sha256": sha256_file(path)}
    atomic_write(record_path(path), [json.dumps(record, indent=1, sort_keys=True).encode()])
    return record


def record_path(path: str) -> str:
    """The JSON record beside the faiss file ``path``."""
    return path[: -len(".faiss")] + ".json" if path.endswith(".faiss") else path + ".json"


def read_record(path: str) -> dict | None:
    """The record of the faiss file ``path``; None when it has none (an unfinished or never-built index).

    Raises:
        IndexFileError: the record is not a valid index record.
    """
    rpath = record_path(path)
    if not os.path.exists(rpath):
        return None
    with open(rpath, "rb") as f:
        try:
            record = parse_json(f.read())
        except ValueError as exc:
            raise IndexFileError(f"{rpath}: not valid JSON ({exc}); delete it and build the index again") from None
    keys = ("format", "version", "store", "curvature", "metric", "spec", "rows", "bytes", "sha256")
    if not isinstance(record, dict) or record.get("format") != FORMAT or any(k not in record for k in keys):
        raise IndexFileError(f"{rpath}: not an airtrace index record; delete it and build the index again")
    if record["version"] != VERSION:
        raise IndexFileError(f"{rpath}: index format version {record['version']!r}, this airtrace reads {VERSION}; "
                          "build the index again")
    return record


def check_file(path: str, record: dict) -> None:
    """Check the faiss file ``path`` against the size and sha256 of its ``record``.

    Raises:
        IndexFileError: missing, truncated or changed file (names it).
    """
    if not os.path.exists(path):
        raise IndexFileError(f"{path}: missing, though its record {record_path(path)} exists; build the index again")
    size = os.path.getsize(path)
    if size != record["bytes"] or sha256_file(path) != record["sha256"]:
        raise IndexFileError(f"{path}: size or sha256 differs from its record ({size} bytes, the record says "
                             f"{record['bytes']}): the file changed after it was written; build the index again")


def read_index(path: str, record: dict):
    """Load the faiss file ``path`` after :func:`check_file`."""
    check_file(path, record)
    return faiss_module().read_index(path)


def remove(path: str) -> None:
    """Delete a faiss file and its record, record first (so no record ever outlives its file)."""
    for name in (record_path(path), path):
        if os.path.exists(name):
            os.unlink(name)
