"""Backend selection: auto order, explicit requests, the environment override, the float64 rule."""

import dataclasses
import subprocess
import sys

import pytest
import torch

import airtrace
from airtrace.ops import backends
from airtrace.ops import project_factored as project_factored_op
from airtrace.ops.project_factored import project_factored


def _small_args():
    return torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(4, 2), torch.randn(5, 2)


def test_auto_prefers_cpu_kernels_for_cpu_tensors():
    name = backends.choose("score_topk", "auto", torch.device("cpu"), torch.float32)
    assert name == ("cpu" if airtrace.available("cpu") else "torch")


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("AIRTRACE_BACKEND", "torch")
    name = backends.choose("project_factored", "auto", torch.device("cpu"), torch.float32)
    assert name == "torch" and project_factored_op.IMPLEMENTATIONS[name] is project_factored_op.reference


@pytest.mark.parametrize("op", ["project_factored", "project_dense", "score_topk", "precondition", "group_pool_scores"])
def test_auto_runs_float64_on_the_reference_even_when_the_environment_names_a_compiled_backend(op, monkeypatch):
    if not airtrace.available("cpu"):
        pytest.skip("backend 'cpu' not built")
    cpu = torch.device("cpu")
    assert backends.choose(op, "auto", cpu, torch.float64) == "torch"
    monkeypatch.setenv("AIRTRACE_BACKEND", "cpu")
    assert backends.choose(op, "auto", cpu, torch.float64) == "torch"
    assert backends.choose(op, "auto", cpu, torch.float32) == "cpu"  # the environment still decides for float32


def test_registry_dtypes_are_the_one_capability_rule(monkeypatch):
    """A backend record that drops a dtype makes "auto" skip that backend and an explicit request fail."""
    if not airtrace.available("cpu"):
        pytest.skip("backend 'cpu' not built")
    cpu = torch.device("cpu")
    monkeypatch.setitem(backends.REGISTRY, "cpu", dataclasses.replace(backends.REGISTRY["cpu"], dtypes=(torch.float32,)))
    assert backends.choose("score_topk", "auto", cpu, torch.bfloat16) == "torch"
    assert backends.choose("score_topk", "auto", cpu, torch.float32) == "cpu"
    with pytest.raises(ValueError, match="score_topk: backend 'cpu' supports float32, got torch.bfloat16"):
        backends.choose("score_topk", "cpu", cpu, torch.bfloat16)


def test_explicit_compiled_backend_refuses_float64_queries():
    """float64 queries against float32 rows promote to float64, which no compiled kernel computes in."""
    if not airtrace.available("cpu"):
        pytest.skip("backend 'cpu' not built")
    Q, X = torch.randn(2, 3, dtype=torch.float64), torch.randn(5, 3)
    with pytest.raises(ValueError, match="score_topk: backend 'cpu' supports float32, bfloat16 and float16, got torch.float64"):
        airtrace.score_topk(Q, X, 2, backend="cpu")
    values, _ = airtrace.score_topk(Q, X, 2)
    assert values.dtype == torch.float64


def test_float64_through_auto_equals_the_reference(monkeypatch):
    monkeypatch.setenv("AIRTRACE_BACKEND", "cpu")
    args = [t.double() for t in _small_args()]
    out = project_factored(*args)
    assert out.dtype == torch.float64
    assert torch.equal(out, project_factored_op.reference(*args))


def test_explicit_unavailable_backend_raises_with_reason():
    if airtrace.available("cuda"):
        pytest.skip("cuda is available here")
    with pytest.raises(airtrace.BackendUnavailable, match="backend 'cuda' is unavailable: (not built|no GPU)"):
        project_factored(*_small_args(), backend="cuda")


def test_cpu_backend_refuses_gpu_tensors_by_name():
    assert "needs CPU tensors" in backends._device_reason("cpu", torch.device("cuda", 0))
    assert "needs CUDA tensors" in backends._device_reason("cuda", torch.device("cpu"))


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        project_factored(*_small_args(), backend="tpu")


def test_all_backends_agree_through_auto_and_explicit():
    args = _small_args()
    auto = project_factored(*args)
    torch.testing.assert_close(auto, project_factored(*args, backend="torch"), rtol=1e-5, atol=1e-6)


def test_env_report_lists_every_backend_with_a_reason():
    out = subprocess.run([sys.executable, "-m", "airtrace.env"], capture_output=True, text=True, check=True).stdout
    for name in airtrace.BACKENDS:
        line = next(line for line in out.splitlines() if line.split()[:2] == ["backend", name])
        assert "available" in line
        if not airtrace.available(name):
            assert "unavailable: " in line and len(line.split("unavailable: ")[1]) > 5
