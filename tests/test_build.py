"""The compiled extensions that this machine can build are really there."""

import importlib.util
import os
import shutil

import pytest

import airtrace


def test_cpu_extension_is_built_with_openmp():
    from airtrace import _C

    assert _C.openmp, "airtrace._C was built without OpenMP"
    assert airtrace.available("cpu")


_GENERIC_PROBE = """
import json, torch
import airtrace
from airtrace import _C
from airtrace.ops import group_pool_scores, precondition, project_dense, project_factored, score_topk
g = torch.Generator().manual_seed(0)
A, G = torch.randn(2, 70, 33, generator=g), torch.randn(2, 70, 21, generator=g)
P_in, P_out = torch.randn(33, 5, generator=g), torch.randn(21, 4, generator=g)
X, Q = torch.randn(300, 40, generator=g), torch.randn(3, 40, generator=g)
Q_G, Q_A = torch.linalg.qr(torch.randn(4, 4, generator=g))[0], torch.linalg.qr(torch.randn(5, 5, generator=g))[0]
Lam, Gh = torch.rand(4, 5, generator=g) + 0.1, torch.randn(3, 4, 5, generator=g)
members, offsets = torch.randint(0, 300, (60,), generator=g), torch.tensor([0, 7, 7, 60])
d = lambda *ts: [t.double() for t in ts]
cases = {
    "project_factored": (airtrace.project_factored(A, G, P_in, P_out, backend="cpu"), project_factored.reference(*d(A, G, P_in, P_out))),
    "project_dense": (airtrace.project_dense(X, 64, seed=3, backend="cpu"), project_dense.reference(X.double(), 64, 3)),
    "score_topk": (airtrace.score_topk(Q, X, 5, backend="cpu")[0], score_topk.reference(*d(Q, X), 5)[0]),
    "precondition": (airtrace.precondition(Gh, Q_G, Q_A, Lam, 0.1, backend="cpu"), precondition.reference(*d(Gh, Q_G, Q_A, Lam), 0.1)),
    "group_pool_scores": (airtrace.group_pool_scores(Q, X, offsets, members, backend="cpu"),
                          group_pool_scores.reference(*d(Q, X), offsets, members)),
}
errors = {op: ((got.double() - want).abs().max() / want.abs().max()).item() for op, (got, want) in cases.items()}
print(json.dumps({"isa": _C.isa(), "errors": errors}))
"""


def test_default_build_is_portable_and_runs_the_generic_variant():
    """The default build holds the generic variant (plain x86-64 on x86-64), never a single -march=native
    one, and with AIRTRACE_CPU_ISA=generic a fresh process imports _C and runs every op correctly."""
    import json
    import platform
    import subprocess
    import sys

    from airtrace import _C

    assert _C.isas_built[0] == "generic" and "native" not in _C.isas_built, _C.isas_built
    if platform.machine() == "x86_64":
        assert _C.isas_built == ("generic", "avx2", "avx512")
    env = {**os.environ, "AIRTRACE_CPU_ISA": "generic"}
    run = subprocess.run([sys.executable, "-c", _GENERIC_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["isa"] == "generic"
    assert all(error < 1e-5 for error in out["errors"].values()), out["errors"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs qemu-x86_64 (apt-get install qemu-user)")
def test_runs_on_a_cpu_without_avx():
    """Under qemu emulating a Westmere CPU (SSE4.2, no AVX) _C picks the generic variant and every op
    matches the reference: no AVX instruction runs outside the avx2/avx512 variants (a -march=native
    build dies here with SIGILL). About 30 s: the whole interpreter is emulated."""
    import json
    import platform
    import subprocess
    import sys

    if platform.machine() != "x86_64":
        pytest.skip("x86-64 only")
    env = {k: v for k, v in os.environ.items() if k != "AIRTRACE_CPU_ISA"}
    run = subprocess.run(["qemu-x86_64", "-cpu", "Westmere", sys.executable, "-c", _GENERIC_PROBE], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-3000:]}"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["isa"] == "generic"
    assert all(error < 1e-5 for error in out["errors"].values()), out["errors"]


@pytest.mark.skipif(
    shutil.which("nvcc") is None and os.environ.get("AIRTRACE_REQUIRE_CUDA_BUILD") != "1",
    reason="nvcc not found: the CUDA extension is not expected here",
)
def test_cuda_extension_is_compiled_when_nvcc_is_present():
    """A build that silently drops CUDA must fail here, even on a machine without a GPU."""
    assert importlib.util.find_spec("airtrace._C_cuda") is not None, "nvcc is present but airtrace._C_cuda was not built"
    from airtrace import _C_cuda

    for name in ("project_factored", "project_dense", "score_topk", "precondition", "group_pool_scores"):
        assert callable(getattr(_C_cuda, name))
    assert set(_C_cuda.cuda_archs.split(",")) >= {"80", "90"}


def test_repository_kernels_folder_is_not_a_top_level_package():
    """`kernels/` ships as airtrace.kernels only: from the repository root (cwd on sys.path, as
    `python -m pytest` has it) the name `kernels` must not resolve into the repository, so
    Hugging Face's `kernels` package (which transformers imports) is not shadowed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    probe = (
        "import importlib.util, json; s = importlib.util.find_spec('kernels'); "
        "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
    spec = __import__("json").loads(out.stdout)
    assert not (root / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes the folder a top-level package"
    folder = (root / "kernels").resolve()
    if spec is not None:
        places = [Path(p).resolve() for p in spec[1]] + ([Path(spec[0]).resolve().parent] if spec[0] else [])
        assert folder not in places, f"`kernels` resolves into the repository's kernels/ folder: {spec}"
    if importlib.util.find_spec("transformers") is not None:
        hub = subprocess.run(
            [sys.executable, "-c", "import transformers.integrations.hub_kernels"], cwd=root, capture_output=True, text=True
        )
        assert hub.returncode == 0, f"transformers' hub-kernels integration does not import here:\n{hub.stderr[-2000:]}"
