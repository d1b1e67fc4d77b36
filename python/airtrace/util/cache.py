"""The user cache folder (``$AIRTRACE_CACHE``, default ``~/.cache/airtrace``) and config hashes that name its entries;
imports nothing from airtrace."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def config_hash(config: dict) -> str:
    """16 hex digits of sha256 over ``config`` as sorted JSON (it must be JSON-serialisable)."""
    try:
        text = json.dumps(config, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"config must be JSON-serialisable to be hashed, got {config!r} ({exc})") from exc
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root(name: str) -> Path:
    """``$AIRTRACE_CACHE/<name>`` when the variable is set, else ``~/.cache/airtrace/<name>``."""
    root = os.environ.get("AIRTRACE_CACHE") or Path.home() / ".cache" / "airtrace"
    return Path(root).expanduser() / name
