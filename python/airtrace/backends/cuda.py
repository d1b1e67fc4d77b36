"""Backend "cuda": the CUDA kernels in ``airtrace._C_cuda``, launched on torch's current stream."""

import torch

from airtrace import _C_cuda
from airtrace.backends.compiled import CompiledBackend


def _current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


_backend = CompiledBackend("cuda", _C_cuda, _current_stream)
project_factored = _backend.project_factored
project_dense = _backend.project_dense
score_topk = _backend.score_topk
precondition = _backend.precondition
group_pool_scores = _backend.group_pool_scores
