"""Backend registry: (op, backend) -> implementation, with availability and reasons.

Each backend is a module exposing one function per op with a fixed signature
(see ``airtrace.ops``). Modules are imported lazily, so a missing compiler,
GPU or Triton only matters when that backend is asked for.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Callable

import torch

log = logging.getLogger("airtrace")

BACKENDS = ("torch", "cpu", "cuda", "triton")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_MODULES = {
    "torch": "airtrace.ref",
    "cpu": "airtrace.backends.cpu",
    "cuda": "airtrace.backends.cuda",
    "triton": "airtrace.backends.triton",
}
ENV_VAR = "AIRTRACE_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def _import_reason(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"not built: cannot import {module} ({exc})"
    return None


def _gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no GPU: torch.cuda.is_available() is False"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def unavailable_reason(backend: str) -> str | None:
    """None if ``backend`` can run in this process, else a sentence saying why not."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return None
    if backend == "cpu":
        return _import_reason("airtrace._C")
    if backend == "cuda":
        return _import_reason("airtrace._C_cuda") or _gpu_reason()
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton not installed ({exc}); pip install triton"
    if _gpu_reason() and not triton_interpreted():
        return "no GPU: Triton kernels need a CUDA device, or TRITON_INTERPRET=1 for the CPU interpreter"
    return None


def available(backend: str) -> bool:
    """Whether ``backend`` ("torch", "cpu", "cuda" or "triton") can run in this process."""
    return unavailable_reason(backend) is None


def _device_reason(backend: str, device: torch.device) -> str | None:
    if backend == "cpu" and device.type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got tensors on {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
    if backend == "triton" and device.type == "cpu" and not triton_interpreted():
        return "backend 'triton' got CPU tensors; set TRITON_INTERPRET=1 to run it on the CPU interpreter"
    return None


@functools.lru_cache(maxsize=None)
def _log_fallback_once(preferred: str, chosen: str, reason: str) -> None:
    log.warning("airtrace: backend %r unavailable (%s); using %r", preferred, reason, chosen)


def resolve(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for tensors on ``device``.

    Raises:
        BackendUnavailable: an explicit backend (argument or $AIRTRACE_BACKEND) cannot run.
    """
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if backend == "auto":
        order = AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]
        for name in order:
            reason = unavailable_reason(name)
            if reason is None:
                if name != order[0]:
                    _log_fallback_once(order[0], name, unavailable_reason(order[0]) or "")
                return name, implementation(op, name)
        raise AssertionError("the torch backend is always available")
    reason = unavailable_reason(backend) or _device_reason(backend, device)
    if reason is not None:
        raise BackendUnavailable(f"{op}: backend {backend!r} is unavailable: {reason}")
    return backend, implementation(op, backend)


def implementation(op: str, backend: str) -> Callable:
    return getattr(importlib.import_module(_MODULES[backend]), op)
