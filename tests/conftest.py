"""Shared fixtures: backends (with skip reasons), devices, tolerances.

Triton runs on the CPU through its interpreter, which must be switched on
before triton is first imported.
"""

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from airtrace import BACKENDS, unavailable_reason  # noqa: E402

# Max |backend - float64 reference| allowed, relative to max |reference|, per input dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    """|actual - reference| <= tol(dtype) * max|reference| elementwise, reference in float64."""
    actual = actual.detach().to("cpu", torch.float64)
    reference = reference.detach().to("cpu", torch.float64)
    assert actual.shape == reference.shape
    scale = reference.abs().max().clamp_min(1e-30)
    error = (actual - reference).abs().max() / scale
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g} > {TOLERANCE[dtype]:g} for {dtype}"
