"""Backend "cpu": the C++/OpenMP kernels in ``airtrace._C``."""

from airtrace import _C
from airtrace.backends.compiled import CompiledBackend

_backend = CompiledBackend("cpu", _C, lambda device: 0)
project_factored = _backend.project_factored
project_dense = _backend.project_dense
score_topk = _backend.score_topk
precondition = _backend.precondition
group_pool_scores = _backend.group_pool_scores
