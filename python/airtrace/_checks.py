"""Argument checks shared by the public API and the config dataclasses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def positive_int(name: str, value: Any) -> int:
    """``value`` when it is an int >= 1 (not a bool).

    Raises:
        ValueError: naming ``name`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def positive_int_fields(config: Any, names: Iterable[str]) -> None:
    """Check the fields ``names`` of a config dataclass with :func:`positive_int` (errors say ``Class.field``)."""
    for name in names:
        positive_int(f"{type(config).__name__}.{name}", getattr(config, name))
