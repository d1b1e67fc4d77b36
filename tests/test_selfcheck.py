"""airtrace selfcheck: every op on every backend here, inputs on the backend's device, judged by airtrace.ops.bounds."""

import pytest
import torch

from airtrace import available, cli
from airtrace.ops import bounds, selfcheck
from airtrace.ops import project_factored as project_factored_op

ALL_CASES = selfcheck.cases


def _rows(out: str) -> list[list[str]]:
    """The table rows of the selfcheck output, split on whitespace (the device column reads "cpu" here)."""
    return [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in selfcheck.OPS]


def _backend(row: list[str]) -> str:
    return row[row.index("cpu") + 1]


def test_quick_selfcheck_passes_every_op_on_every_backend_here(capsys):
    """On this machine: torch, cpu and the Triton interpreter (TRITON_INTERPRET=1, set by conftest)."""
    assert cli.main(["selfcheck", "--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    here = [b for b in ("torch", "cpu", "triton") if available(b)]
    rows = _rows(out)
    checked = {(row[0], _backend(row)) for row in rows}
    assert checked == {(op, b) for op in selfcheck.OPS for b in here}
    assert all("PASS" in row for row in rows)
    assert "every backend is within the fp32-accumulation bound" in out


def test_a_backend_with_a_precision_bug_fails(monkeypatch, capsys):
    """The verdict is the tests' bound: a cpu backend rounding its float32 result to bfloat16 is reported."""
    if not available("cpu"):
        pytest.skip("backend 'cpu' not built")
    real = project_factored_op.IMPLEMENTATIONS["cpu"]
    monkeypatch.setitem(project_factored_op.IMPLEMENTATIONS, "cpu", lambda *a: real(*a).bfloat16().float())
    monkeypatch.setattr(selfcheck, "cases", lambda scale, small: ALL_CASES(scale, small)[:1])
    assert cli.main(["selfcheck", "--quick", "--repeats", "1"]) == 1
    out = capsys.readouterr().out
    assert [_backend(row) for row in _rows(out) if "FAIL" in row] == ["cpu"]
    assert "MISMATCH" in out


def test_each_backend_gets_its_inputs_on_its_own_device(monkeypatch):
    """On a GPU machine cuda and triton compute on GPU tensors and the CPU backends on CPU tensors; emulated
    here with the meta device standing for the GPU."""
    seen = []

    def run(backend, x):
        seen.append((backend, x.device.type))
        return torch.ones(2)

    ones = torch.ones(2, dtype=torch.float64)
    case = selfcheck.Case("fake", "n=2", (torch.ones(2),), run, lambda: bounds.Expected(ones, ones))
    gpu = torch.device("meta")
    monkeypatch.setattr(selfcheck, "cases", lambda scale, small: [case])
    monkeypatch.setattr(selfcheck, "devices", lambda: [torch.device("cpu"), gpu])
    monkeypatch.setattr(selfcheck, "backends_on", lambda d: ["torch", "cpu"] if d.type == "cpu" else ["torch", "cuda", "triton"])
    rows = selfcheck.run(repeats=1, quick=True, progress=lambda m: None)
    assert {(r.backend, r.device) for r in rows} == {("torch", "cpu"), ("cpu", "cpu"), ("torch", "meta"),
                                                     ("cuda", "meta"), ("triton", "meta")}
    assert set(seen) == {("torch", "cpu"), ("cpu", "cpu"), ("torch", "meta"), ("cuda", "meta"), ("triton", "meta")}
    assert all(r.passed and r.speedup is not None for r in rows)


def test_backends_on_follows_the_dispatcher():
    cpu = selfcheck.backends_on(torch.device("cpu"))
    assert "torch" in cpu and "cuda" not in cpu
    assert ("cpu" in cpu) == available("cpu") and ("triton" in cpu) == available("triton")
