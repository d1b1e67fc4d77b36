"""Shared fixtures: backends (with skip reasons), devices, tolerances.

Triton runs on the CPU through its interpreter, which must be switched on
before triton is first imported.
"""

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


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    reason = unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(f"backend {request.param!r}: {reason}")
    return request.param


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
