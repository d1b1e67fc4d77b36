"""Where evaluation ground truth lives: ``$AIRTRACE_CACHE/eval/<config hash>/`` (default ``~/.cache/airtrace``)."""

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


def cache_root(name: str = "eval") -> Path:
    """``$AIRTRACE_CACHE/<name>`` when the variable is set, else ``~/.cache/airtrace/<name>``."""
    root = os.environ.get("AIRTRACE_CACHE") or Path.home() / ".cache" / "airtrace"
    return Path(root).expanduser() / name


def cache_dir(config: dict) -> Path:
    """``cache_root() / config_hash(config)``, created, with the config written to ``config.json`` beside the runs."""
    path = cache_root() / config_hash(config)
    path.mkdir(parents=True, exist_ok=True)
    record = path / "config.json"
    if not record.exists():
        tmp = path / "config.json.tmp"
        tmp.write_text(json.dumps(config, sort_keys=True, indent=1))
        os.replace(tmp, record)
    return path
