"""Argument checks shared by the ops, the public API and the config dataclasses; imports nothing from airtrace."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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


def check_tensor(name: str, t: Any, ndim: int) -> None:
    """``t`` must be an ``ndim``-D float32/bfloat16/float16/float64 tensor.

    Raises:
        TypeError: not a tensor. ValueError: wrong rank or dtype (naming ``name``).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float32/bfloat16/float16/float64 tensor, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """The one device of the given tensors (None entries are skipped).

    Raises:
        ValueError: listing each tensor's device when they differ.
    """
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def check_offset(name: str, value: Any) -> int:
    """``value`` when it is an int >= 0 (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value
