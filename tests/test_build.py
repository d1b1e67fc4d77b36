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
