"""Shared fixtures: backends (with skip reasons), devices, the error-bound assertions (airtrace.ops.bounds).

Triton runs on the CPU through its interpreter, which must be switched on
before triton is first imported.
"""

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from airtrace import BACKENDS, unavailable_reason  # noqa: E402
from airtrace.ops import bounds  # noqa: E402

COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)


def backend_device(name: str) -> torch.device:
    """Where a backend's inputs live: CUDA for cuda (and triton when a GPU exists)."""
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_isas() -> tuple[str, ...]:
    """The instruction-set variants compiled into airtrace._C (none when it is not built)."""
    try:
        from airtrace import _C
    except ImportError:
        return ()
    return tuple(_C.isas_built)


@contextlib.contextmanager
def cpu_isa(isa: str):
    """Run the CPU kernels of variant ``isa`` inside the block; skip the test when this CPU cannot."""
    from airtrace import _C

    try:
        previous = _C.isa()
    except ValueError:  # AIRTRACE_CPU_ISA asked for a variant that cannot run here
        previous = "auto"
    try:
        _C.set_isa(isa)
    except ValueError as exc:
        pytest.skip(str(exc))
    assert isa == "auto" or _C.isa() == isa
    try:
        yield
    finally:
        _C.set_isa(previous)


def backend_params() -> list[str]:
    """Every backend as a test parameter, the cpu backend once per CPU variant ("cpu-avx2")."""
    params = []
    for name in BACKENDS:
        params += [f"{name}-{isa}" for isa in (cpu_isas() if name == "cpu" else ())] or [name]
    return params


@pytest.fixture(params=backend_params())
def backend(request):
    name, _, isa = request.param.partition("-")
    reason = unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"backend {name!r}: {reason}")
    if not isa:
        yield name
        return
    with cpu_isa(isa):
        yield name


@pytest.fixture
def device(backend) -> torch.device:
    return backend_device(backend)


def assert_within_bound(actual: torch.Tensor, expected: bounds.Expected) -> None:
    """|actual - float64 reference| <= the op's fp32-accumulation bound, element by element (airtrace.ops.bounds)."""
    ratio = bounds.excess(actual, expected)
    scale = float(expected.reference.abs().max()) if expected.reference.numel() else 0.0
    actual = actual.detach().to(expected.reference.device, torch.float64)
    error = float((actual - expected.reference).abs().max()) if scale else 0.0
    assert ratio <= 1, (
        f"|backend - float64 reference| reaches {ratio:.3g} times the fp32-accumulation bound "
        f"(max error {error:.3g}, max |reference| {scale:.3g})"
    )


def assert_topk_within_bound(values, indices, expected: bounds.Expected, index_offset: int = 0) -> None:
    """A score_topk result is a top-k of scores within the bound of the float64 scores (airtrace.ops.bounds)."""
    ratio = bounds.topk_excess(values, indices, expected, index_offset)
    assert ratio <= 1, f"score_topk result is {ratio:.3g} times the fp32-accumulation bound from a true top-k"


def exceeds_bound(actual: torch.Tensor, expected: bounds.Expected) -> bool:
    """Whether ``actual`` (e.g. a result with a known precision bug) fails the bound somewhere."""
    return bounds.excess(actual, expected) > 1


def few_triton_programs(monkeypatch, op: str, programs: int) -> None:
    """Launch the Triton kernel of ``op`` with about ``programs`` programs (kernels/<op>.py PROGRAMS), so that a
    shape small enough for the CPU interpreter still gives each program several tiles to walk and several
    programs to merge."""
    monkeypatch.setattr(f"airtrace.kernels.{op}.PROGRAMS", programs)
