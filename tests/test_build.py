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
