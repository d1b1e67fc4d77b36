"""Shared tensor -> pointer adapter for the pybind11 kernel modules (_C, _C_cuda).

The extension functions take raw data pointers and sizes; ``airtrace.ops`` has
already checked shapes, devices and contiguity. Here we check dtypes and
allocate outputs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch

from airtrace.ref.hash import KINDS

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(t: torch.Tensor, name: str, backend: str) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise ValueError(
            f"{name}: backend {backend!r} supports float32, bfloat16 and float16, got {t.dtype}"
            " (use backend='torch' for float64)"
        ) from None


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


class CompiledBackend:
    """The ops on top of one extension module; ``stream`` gives the launch stream (0 on CPU)."""

    def __init__(self, name: str, module: ModuleType, stream: Callable[[torch.device], int]):
        self.name, self.module, self.stream = name, module, stream

    def project_factored(self, A, G, P_in, P_out, mask):
        code = dtype_code(A, "A", self.name)
        B, T, d_in = A.shape
        d_out = G.shape[2]
        P_in, P_out = _fp32(P_in), _fp32(P_out)
        k_in, k_out = P_in.shape[1], P_out.shape[1]
        mask = None if mask is None else _fp32(mask)
        out = torch.empty(B, k_out, k_in, dtype=torch.float32, device=A.device)
        self.module.project_factored(
            A.data_ptr(), G.data_ptr(), code, 0 if mask is None else mask.data_ptr(),
            P_in.data_ptr(), P_out.data_ptr(), B, T, d_in, d_out, k_in, k_out,
            out.data_ptr(), self.stream(A.device),
        )
        return out

    def project_dense(self, X, k, seed, kind, row_offset, out):
        code = dtype_code(X, "X", self.name)
        self.module.project_dense(
            X.data_ptr(), code, X.shape[0], X.shape[1], X.stride(0), row_offset, k, seed,
            KINDS.index(kind), out.data_ptr(), self.stream(X.device),
        )
        return out

    def score_topk(self, Q, X, topk, normalize, index_offset):
        code = dtype_code(X, "X", self.name)
        Q = _fp32(Q)
        q, n, k = Q.shape[0], X.shape[0], X.shape[1]
        values = torch.empty(q, topk, dtype=torch.float32, device=Q.device)
        indices = torch.empty(q, topk, dtype=torch.int64, device=Q.device)
        self.module.score_topk(
            Q.data_ptr(), X.data_ptr(), code, q, n, k, topk, bool(normalize), index_offset,
            values.data_ptr(), indices.data_ptr(), self.stream(Q.device),
        )
        return values, indices

    def precondition(self, G_hat, Q_G, Q_A, Lam, damping):
        code = dtype_code(G_hat, "G_hat", self.name)
        B, k_out, k_in = G_hat.shape
        Q_G, Q_A, Lam = _fp32(Q_G), _fp32(Q_A), _fp32(Lam)
        out = torch.empty(B, k_out, k_in, dtype=torch.float32, device=G_hat.device)
        self.module.precondition(
            G_hat.data_ptr(), code, Q_G.data_ptr(), Q_A.data_ptr(), Lam.data_ptr(), float(damping),
            B, k_out, k_in, out.data_ptr(), self.stream(G_hat.device),
        )
        return out

    def group_pool_scores(self, queries, train, offsets, members):
        code = dtype_code(train, "train", self.name)
        queries = _fp32(queries)
        q, d = queries.shape
        G = offsets.shape[0] - 1
        out = torch.empty(q, G, dtype=torch.float32, device=queries.device)
        self.module.group_pool_scores(
            queries.data_ptr(), train.data_ptr(), code, q, d, offsets.data_ptr(), members.data_ptr(), G,
            out.data_ptr(), self.stream(queries.device),
        )
        return out
