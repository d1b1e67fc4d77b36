"""Backend selection: auto order, explicit requests, the environment override."""

import subprocess
import sys

import pytest
import torch

import airtrace
from airtrace import _dispatch, ops


def _small_args():
    return torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(4, 2), torch.randn(5, 2)


def test_auto_prefers_cpu_kernels_for_cpu_tensors():
    name, _ = _dispatch.resolve("score_topk", "auto", torch.device("cpu"))
    assert name == ("cpu" if airtrace.available("cpu") else "torch")


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("AIRTRACE_BACKEND", "torch")
    name, impl = _dispatch.resolve("project_factored", "auto", torch.device("cpu"))
    assert name == "torch" and impl is airtrace.ref.project_factored


def test_explicit_unavailable_backend_raises_with_reason():
    if airtrace.available("cuda"):
        pytest.skip("cuda is available here")
    with pytest.raises(airtrace.BackendUnavailable, match="backend 'cuda' is unavailable: (not built|no GPU)"):
        ops.project_factored(*_small_args(), backend="cuda")


def test_cpu_backend_refuses_gpu_tensors_by_name():
    assert "needs CPU tensors" in _dispatch._device_reason("cpu", torch.device("cuda", 0))
    assert "needs CUDA tensors" in _dispatch._device_reason("cuda", torch.device("cpu"))


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ops.project_factored(*_small_args(), backend="tpu")


def test_all_backends_agree_through_auto_and_explicit():
    args = _small_args()
    auto = ops.project_factored(*args)
    torch.testing.assert_close(auto, ops.project_factored(*args, backend="torch"), rtol=1e-5, atol=1e-6)


def test_env_report_lists_every_backend_with_a_reason():
    out = subprocess.run([sys.executable, "-m", "airtrace.env"], capture_output=True, text=True, check=True).stdout
    for name in airtrace.BACKENDS:
        line = next(line for line in out.splitlines() if line.split()[:2] == ["backend", name])
        assert "available" in line
        if not airtrace.available(name):
            assert "unavailable: " in line and len(line.split("unavailable: ")[1]) > 5
