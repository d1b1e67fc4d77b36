"""Safetensors files that carry their own checksum (curvature, fitter states, store sidecars): written atomically,
checked when read; imports nothing from airtrace.

The file's metadata holds one key, naming the kind of file, whose value is a JSON
record that includes ``"sha256"``: sha256 over the rest of the record (sorted JSON)
and every tensor's name, dtype, shape and bytes. One key only, because the
safetensors library writes several metadata keys in an arbitrary order, and the
files must be byte-identical from run to run. A file without the checksum, or
whose content no longer matches it, is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CHECKSUM = "sha256"
"""The record field that holds the checksum."""


def checksum(tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> str:
    """sha256 hex of ``record`` (sorted JSON, without :data:`CHECKSUM`) and every tensor's name, dtype, shape and
    bytes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in record.items() if k != CHECKSUM}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def save_checked(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, key: str,
                 record: Mapping[str, Any]) -> None:
    """Write a safetensors file whose metadata ``key`` holds ``record`` (JSON-serialisable) and its checksum, through
    a temp file renamed into place.

    A failure (a full disk, say) leaves an existing file at ``path`` as it was and no temp file.

    Raises:
        OSError: naming ``path`` and the cause, whatever the safetensors library raised.
    """
    path = os.fspath(path)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    text = json.dumps({**record, CHECKSUM: checksum(tensors, record)})
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file(tensors, tmp, metadata={key: text})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        error = OSError(f"could not write {path}: {getattr(exc, 'strerror', None) or exc}")
        error.errno = getattr(exc, "errno", None)
        raise error from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checked(path: str | os.PathLike, key: str | None = None, kind: str = "an airtrace file"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors (on the CPU) and record of a file written by :func:`save_checked`, its checksum checked.

    Args:
        path: the file.
        key: the metadata key of the expected kind of file; None takes the file's one key, whatever it is.
        kind: what such a file is, for the errors (e.g. "an airtrace curvature file").

    Raises:
        ValueError: naming the file: unreadable, not a safetensors file, not of the kind, without a checksum (an
            older airtrace's), or a checksum mismatch.
    """
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    if key is None and len(metadata) == 1:
        key = next(iter(metadata))
    if key not in metadata:
        raise ValueError(f"{path}: not {kind} (no {key!r} metadata)")
    try:
        record = json.loads(metadata[key])
    except ValueError:
        record = None
    if not isinstance(record, dict) or CHECKSUM not in record:
        raise ValueError(f"{path}: {kind} without a checksum, written by an older airtrace or another tool. Fix: "
                         "make it again with this version of airtrace")
    if record[CHECKSUM] != checksum(tensors, record):
        raise ValueError(f"{path}: checksum mismatch: the file changed since it was written (flipped bytes?)")
    return tensors, record
