"""The CPU kernel variants: the automatic pick, and clear errors for variants that cannot run.

The kernel tests run every op under each variant this CPU can execute (conftest's backend
fixture); here: which variant is picked, and what happens when one is forced.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cpu_isa

_C = pytest.importorskip("airtrace._C", reason="not built: airtrace._C")

# /proc/cpuinfo flags of the x86-64 psABI levels each variant is compiled for (lzcnt is "abm").
CPUINFO_FLAGS = {
    "avx2": {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2",
             "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
}
CPUINFO_FLAGS["avx512"] = CPUINFO_FLAGS["avx2"] | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def _cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("/proc/cpuinfo has no flags line")


def test_auto_runs_the_best_variant_this_cpu_can_execute():
    assert _C.isas_available, "no runnable CPU variant"
    assert set(_C.isas_available) <= set(_C.isas_built)
    with cpu_isa("auto"):
        assert _C.isa() == _C.isas_available[-1]


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="x86-64 Linux only")
def test_runnable_variants_agree_with_proc_cpuinfo():
    flags = _cpuinfo_flags()
    for isa in set(_C.isas_built) & set(CPUINFO_FLAGS):
        expected = CPUINFO_FLAGS[isa] <= flags
        assert (isa in _C.isas_available) == expected, (
            f"{isa}: runnable={isa in _C.isas_available}, /proc/cpuinfo lacks {sorted(CPUINFO_FLAGS[isa] - flags)}")


def test_unknown_variant_is_a_clear_error_and_changes_nothing():
    before = _C.isa()
    with pytest.raises(ValueError, match=r"no CPU variant 'sse9' in this build of airtrace._C \(built: generic"):
        _C.set_isa("sse9")
    assert _C.isa() == before


def _unrunnable() -> str:
    missing = [isa for isa in _C.isas_built if isa not in _C.isas_available]
    if not missing:
        pytest.skip(f"this CPU runs every built variant ({' '.join(_C.isas_built)})")
    return missing[-1]


def test_variant_the_cpu_cannot_run_is_a_clear_error_naming_its_features():
    isa, before = _unrunnable(), _C.isa()
    with pytest.raises(ValueError) as info:
        _C.set_isa(isa)
    message = str(info.value)
    assert f"CPU variant '{isa}' is compiled for x86-64-v" in message and "which this CPU does not support (it lacks " in message
    assert f"this CPU has: {' '.join(_C.cpu_features)}." in message
    assert f"Variants it can run: {' '.join(_C.isas_available)}" in message
    assert _C.isa() == before


_PROBE = """
import json, torch
import airtrace
from airtrace import _C
out = {}
for key, call in (("isa", _C.isa), ("op", lambda: airtrace.score_topk(torch.randn(2, 8), torch.randn(5, 8), 2))):
    try:
        call()
        out[key] = None
    except ValueError as exc:
        out[key] = str(exc)
print(json.dumps(out))
"""


def test_forcing_an_impossible_variant_by_environment_fails_every_cpu_kernel_call():
    """AIRTRACE_CPU_ISA naming a variant that cannot run: airtrace still imports, but _C.isa() and
    every CPU kernel call (backend auto included: no silent fallback to torch) raise the same error."""
    isa = next((i for i in _C.isas_built if i not in _C.isas_available), "sse9")
    env = {**os.environ, "AIRTRACE_CPU_ISA": isa}
    run = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["isa"] is not None and out["isa"].startswith(f"AIRTRACE_CPU_ISA={isa}: ")
    assert "Fix: set AIRTRACE_CPU_ISA to one of those, or unset it." in out["isa"]
    assert out["op"] == out["isa"]
