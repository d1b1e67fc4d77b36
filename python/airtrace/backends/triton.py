"""Backend "triton": the Triton kernels shipped as ``airtrace.kernels``."""

from airtrace.kernels.project_dense import project_dense
from airtrace.kernels.project_factored import project_factored
from airtrace.kernels.score_topk import score_topk

__all__ = ["project_dense", "project_factored", "score_topk"]
