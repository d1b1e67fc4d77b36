"""Backend "triton": the Triton kernels shipped as ``airtrace.kernels``."""

from airtrace.kernels.group_pool_scores import group_pool_scores
from airtrace.kernels.precondition import precondition
from airtrace.kernels.project_dense import project_dense
from airtrace.kernels.project_factored import project_factored
from airtrace.kernels.score_topk import score_topk

__all__ = ["group_pool_scores", "precondition", "project_dense", "project_factored", "score_topk"]
