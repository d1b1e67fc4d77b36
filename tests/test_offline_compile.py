"""Every GPU kernel compiles for its target without a GPU (slow: minutes): CUDA for sm_80 and sm_90a, Triton for sm_90.

``pytest -q -m slow tests/test_offline_compile.py``; benches/offline_compile.py does the compiling and writes the
per-kernel registers, shared and local memory of both into benches/results/offline-sm80-sm90/.
"""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benches"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", sorted(p.name for p in (REPO / "csrc" / "cuda").glob("*.cu")))
def test_cuda_source_compiles_for_sm80_and_sm90a(source, tmp_path):
    import offline_compile

    rows = offline_compile.compile_cuda(REPO / "csrc" / "cuda" / source, tmp_path)
    assert all(r["status"] == "ok" or r["status"].startswith("compiled") for r in rows), rows
    if offline_compile.cuobjdump() is None:
        pytest.skip("compiled; no cuobjdump to list the kernels per architecture")
    kernels = {arch: {r["kernel"] for r in rows if r["arch"] == arch} for arch in ("sm_80", "sm_90a")}
    assert kernels["sm_80"] and kernels["sm_80"] == kernels["sm_90a"], kernels


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_every_triton_launch_compiles_for_sm90():
    """The launches the Triton launchers make for every op and input dtype, compiled to PTX and a cubin. Runs in a
    fresh interpreter: this suite imports triton in interpreter mode."""
    code = ("import sys, tempfile, pathlib; sys.path.insert(0, 'benches'); import offline_compile as o; "
            "rows = o.compile_triton(pathlib.Path(tempfile.mkdtemp())); "
            "print(len(rows), sorted({r['kernel'] for r in rows if r['status'] == 'ok'})); "
            "[print('FAILED', r) for r in rows if r['status'] != 'ok']")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=1200,
                         env={k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FAILED" not in run.stdout, run.stdout[-3000:]
    for kernel in ("_project_factored_kernel", "_project_dense_kernel", "_score_topk_kernel", "_precondition_kernel",
                   "_group_pool_scores_kernel"):
        assert kernel in run.stdout, run.stdout[-2000:]
