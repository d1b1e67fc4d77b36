"""The backend registry: each backend's devices, dtypes and availability (with the reason), which backend runs a call,
and the precision rule; imports only ``airtrace.util`` and (lazily) the compiled extensions.

Every op takes ``backend="auto" | "torch" | "cpu" | "cuda" | "triton"``
($AIRTRACE_BACKEND overrides "auto"). "auto" picks cuda, triton, torch for CUDA
tensors and cpu, torch for CPU tensors; only "torch" (the float64 reference) takes
float64, so "auto" runs float64 inputs there. An explicitly requested backend that
cannot run raises :class:`BackendUnavailable` with the reason; an automatic fallback
logs it once. The ops (``airtrace.ops.<op>``) hold each backend's implementation.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from airtrace.util.checks import FLOAT_DTYPES

log = logging.getLogger("airtrace")

COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""The dtype argument of the compiled and Triton kernels."""
ENV_VAR = "AIRTRACE_BACKEND"


@dataclass(frozen=True)
class Backend:
    """One kernel backend.

    Attributes:
        name: "torch", "cpu", "cuda" or "triton".
        devices: device types whose tensors it takes ("cpu" for triton only under TRITON_INTERPRET=1).
        dtypes: input dtypes it takes (accumulation is fp32, float64 only on "torch").
        library: the extension module of its compiled kernels, if any.
    """

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    library: str | None = None


REGISTRY = {
    backend.name: backend
    for backend in (
        Backend("torch", ("cpu", "cuda"), FLOAT_DTYPES),
        Backend("cpu", ("cpu",), COMPILED_DTYPES, "airtrace._C"),
        Backend("cuda", ("cuda",), COMPILED_DTYPES, "airtrace._C_cuda"),
        Backend("triton", ("cuda", "cpu"), COMPILED_DTYPES),
    )
}
BACKENDS = tuple(REGISTRY)
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the exact reference); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    if backend not in REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return None
    library = REGISTRY[backend].library
    if library is not None:
        return _import_reason(library) or (_gpu_reason() if "cuda" in REGISTRY[backend].devices else None)
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
    if backend == "triton":
        if device.type == "cpu" and not triton_interpreted():
            return "backend 'triton' got CPU tensors; set TRITON_INTERPRET=1 to run it on the CPU interpreter"
        return None
    devices = REGISTRY[backend].devices
    if device.type not in devices:
        return f"backend {backend!r} needs {devices[0].upper()} tensors, got tensors on {device}"
    return None


def _dtype_reason(backend: str, dtype: torch.dtype | None) -> str | None:
    dtypes = REGISTRY[backend].dtypes
    if dtype is None or dtype in dtypes:
        return None
    names = [str(d).removeprefix("torch.") for d in dtypes]
    names = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"backend {backend!r} supports {names}, got {dtype} (use backend='torch' for float64)"


@functools.lru_cache(maxsize=None)
def _log_fallback_once(preferred: str, chosen: str, reason: str) -> None:
    log.warning("airtrace: backend %r unavailable (%s); using %r", preferred, reason, chosen)


def choose(op: str, backend: str, device: torch.device, dtype: torch.dtype | None) -> str:
    """The backend that runs ``op`` on inputs of ``dtype`` on ``device``: the one rule of backend capability.

    A backend can run a call when it is available here, takes tensors on ``device`` and takes
    ``dtype`` (its :class:`Backend` record). "auto" means $AIRTRACE_BACKEND when that backend
    takes ``dtype``, else the first backend of :data:`AUTO_ORDER` for the device that can run
    the call (so float64, which only "torch" takes, runs there even when $AIRTRACE_BACKEND
    names a compiled backend). ``dtype`` None: an op on raw bytes, which every backend takes.

    Raises:
        ValueError: an unknown backend name, or an explicit backend that does not take ``dtype``.
        BackendUnavailable: an explicit backend (argument or $AIRTRACE_BACKEND) cannot run here.
    """
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend != "auto" and backend in REGISTRY and _dtype_reason(backend, dtype) is not None:
            backend = "auto"
    if backend == "auto":
        order = AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]
        for name in order:
            if _dtype_reason(name, dtype) is None and unavailable_reason(name) is None:
                if name != order[0] and _dtype_reason(order[0], dtype) is None:
                    _log_fallback_once(order[0], name, unavailable_reason(order[0]) or "")
                return name
        raise AssertionError("the torch backend takes every dtype and is always available")
    reason = unavailable_reason(backend) or _device_reason(backend, device)
    if reason is not None:
        raise BackendUnavailable(f"{op}: backend {backend!r} is unavailable: {reason}")
    reason = _dtype_reason(backend, dtype)
    if reason is not None:
        raise ValueError(f"{op}: {reason}")
    return backend


def dtype_code(t: torch.Tensor, name: str, backend: str) -> int:
    """The kernels' code of ``t``'s dtype (:func:`choose` has already refused a dtype that ``backend`` does not take).

    Raises:
        ValueError: naming ``name`` and ``backend``, for a dtype outside the compiled kernels' codes.
    """
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise ValueError(f"{name}: {_dtype_reason(backend, t.dtype)}") from None


def _current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def library(backend: str) -> tuple[ModuleType, Callable[[torch.device], int]]:
    """The extension module of a compiled backend ("cpu", "cuda") and its launch stream per device (0 on CPU)."""
    module = importlib.import_module(REGISTRY[backend].library)
    return module, (_current_stream if backend == "cuda" else lambda device: 0)


def implementations(reference: Callable, compiled: Callable, triton: Callable) -> dict[str, Callable]:
    """One op's implementation per backend, all with the same arguments.

    Args:
        reference: the pure-torch reference (backend "torch").
        compiled: ``compiled(backend, *args)`` calling the op's kernel of :func:`library` ("cpu", "cuda").
        triton: the op's Triton launcher.
    """
    return {"torch": reference, "cpu": functools.partial(compiled, "cpu"), "cuda": functools.partial(compiled, "cuda"),
            "triton": triton}
