"""Store errors: ``StoreError`` (a ValueError) and its subclasses, each naming the file and the fix; imports only
``airtrace.util.fix``."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from typing import Any

from airtrace.util.fix import with_fix


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
        with_fix(self, "write to a new directory, or pass --overwrite to replace the store.")


class SidecarError(StoreError):
    """A sidecar file (derived data next to the shards) is unreadable, foreign or fails its checksum."""


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
        with_fix(self, "score it as it is, or pass --overwrite to write it again.")


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
