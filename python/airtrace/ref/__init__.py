"""Pure-torch reference implementations (backend "torch"), float64-capable."""

from airtrace.ref.hash import dense_entries
from airtrace.ref.pool import group_pool_scores
from airtrace.ref.precondition import precondition_ekfac
from airtrace.ref.project import project_dense, project_factored
from airtrace.ref.score import merge_topk, score_topk

precondition = precondition_ekfac  # the "torch" backend of ops.precondition

__all__ = [
    "dense_entries",
    "group_pool_scores",
    "merge_topk",
    "precondition",
    "precondition_ekfac",
    "project_dense",
    "project_factored",
    "score_topk",
]
