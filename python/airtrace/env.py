"""``python -m airtrace.env`` (and ``airtrace env``): which backends can run here and, for each that cannot, why; an
app, it imports the backend registry and the package version."""

from __future__ import annotations

import importlib
import platform

import torch

from airtrace import __version__
from airtrace.ops.backends import BACKENDS, REGISTRY, unavailable_reason


def _cuda_archs() -> str:
    try:
        library = importlib.import_module(REGISTRY["cuda"].library)
    except ImportError:
        return ""
    return f" (compiled for sm {library.cuda_archs})"


def _cpu_isa() -> str:
    try:
        from airtrace import _C
    except ImportError:
        return ""
    try:
        isa = _C.isa()
    except ValueError as exc:  # AIRTRACE_CPU_ISA asked for a variant that cannot run here
        isa = f"none: {exc}"
    return (f" (CPU variant {isa}; built: {' '.join(_C.isas_built)}; this CPU runs: {' '.join(_C.isas_available)};"
            f" set AIRTRACE_CPU_ISA to force one)")


def report() -> str:
    """A short text table of the environment and backend availability."""
    lines = [
        f"airtrace {__version__}  python {platform.python_version()}  torch {torch.__version__}",
        f"cpu threads: {torch.get_num_threads()}  cuda devices: {torch.cuda.device_count()}",
    ]
    for name in BACKENDS:
        reason = unavailable_reason(name)
        extra = _cuda_archs() if name == "cuda" else _cpu_isa() if name == "cpu" else ""
        lines.append(f"  backend {name:<7} {'available' if reason is None else 'unavailable: ' + reason}{extra}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
