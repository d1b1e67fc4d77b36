"""Where evaluation ground truth lives: ``$AIRTRACE_CACHE/eval/<config hash>/`` (default ``~/.cache/airtrace``); imports
``airtrace.util``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from airtrace.util.cache import cache_root, config_hash

NAME = "eval"
"""The cache folder of the evaluation ground truth, under the cache root."""


def cache_dir(config: dict) -> Path:
    """``cache_root("eval") / config_hash(config)``, created, with the config written to ``config.json`` beside the runs."""
    path = cache_root(NAME) / config_hash(config)
    path.mkdir(parents=True, exist_ok=True)
    record = path / "config.json"
    if not record.exists():
        tmp = path / "config.json.tmp"
        tmp.write_text(json.dumps(config, sort_keys=True, indent=1))
        os.replace(tmp, record)
    return path
