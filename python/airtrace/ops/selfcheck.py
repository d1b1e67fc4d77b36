"""Kernel self-check (``airtrace selfcheck``): every available backend against the float64 reference, with timings;
imports only the kernels layer.

Runs each public op on realistic shapes, reports the relative error of every
backend against the float64 torch reference and the speed-up over the torch
reference measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from airtrace.ops import group_pool_scores, project_dense, project_factored, project_sparse, score_topk
from airtrace.ops.backends import BACKENDS, available, triton_interpreted

TOLERANCE = 1e-4  # relative to max |reference|, fp32 accumulation


@dataclass
class Case:
    op: str
    shape: str
    run: Callable[[str], torch.Tensor]  # backend -> result
    reference: Callable[[], torch.Tensor]  # float64


@dataclass
class Row:
    op: str
    shape: str
    backend: str
    error: float
    seconds: float
    speedup: float


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _cases(scale: int) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    B, T, d, kf = 4 * scale, 64 * scale, 576, 32
    A = torch.randn(B, T, d, generator=g)
    G = torch.randn(B, T, d, generator=g)
    P_in = torch.randn(d, kf, generator=g) / d**0.5
    P_out = torch.randn(d, kf, generator=g) / d**0.5
    mask = torch.rand(B, T, generator=g) > 0.2
    Xd = torch.randn(8, 50_000 * scale, generator=g)
    Q = torch.randn(64, 1024, generator=g)
    Xs = torch.randn(20_000 * scale, 1024, generator=g).bfloat16()
    Qp, Xp, Gp = torch.randn(64, 384, generator=g), torch.randn(20_000 * scale, 384, generator=g), 2_000 * scale
    members = torch.randint(0, Xp.shape[0], (Gp * 50,), generator=g)
    offsets = torch.arange(0, Gp * 50 + 1, 50)
    return [
        Case(
            "project_factored",
            f"B={B} T={T} d={d} k={kf}x{kf} fp32",
            lambda b: project_factored.project_factored(A, G, P_in, P_out, mask, backend=b),
            lambda: project_factored.reference(A.double(), G.double(), P_in.double(), P_out.double(), mask),
        ),
        Case(
            "project_dense",
            f"B=8 p={Xd.shape[1]} k=1024 rademacher",
            lambda b: project_dense.project_dense(Xd, 1024, seed=7, backend=b),
            lambda: project_dense.reference(Xd.double(), 1024, 7),
        ),
        Case(
            "project_sparse",
            f"B=8 p={Xd.shape[1]} k=1024 s=2",
            lambda b: project_sparse.project_sparse(Xd, 1024, 2, seed=7, backend=b),
            lambda: project_sparse.reference(Xd.double(), 1024, 2, 7),
        ),
        Case(
            "score_topk",
            f"q=64 n={Xs.shape[0]} k=1024 bf16 top10",
            lambda b: score_topk.score_topk(Q, Xs, 10, backend=b)[0],
            lambda: score_topk.reference(Q.double(), Xs.double(), 10)[0],
        ),
        Case(
            "group_pool_scores",
            f"q=64 n={Xp.shape[0]} d=384 G={Gp}x50 fp32",
            lambda b: group_pool_scores.group_pool_scores(Qp, Xp, offsets, members, backend=b),
            lambda: group_pool_scores.reference(Qp.double(), Xp.double(), offsets, members),
        ),
    ]


def _runnable_backends() -> list[str]:
    """Backends that can run on CPU tensors at full speed (not the Triton interpreter)."""
    return [b for b in BACKENDS if b not in ("cuda",) and available(b) and not (b == "triton" and triton_interpreted())]


def run(scale: int = 1, repeats: int = 3, progress: Callable[[str], None] = print) -> list[Row]:
    """Check and time every op on every runnable CPU backend; returns one Row per (op, backend)."""
    rows = []
    for case in _cases(scale):
        progress(f"checking {case.op} ({case.shape}) ...")
        expected = case.reference()
        scale_ref = expected.abs().max().item()
        times = {}
        for backend in _runnable_backends():
            got = case.run(backend).double()
            error = (got - expected).abs().max().item() / max(scale_ref, 1e-30)
            times[backend] = _median_seconds(lambda: case.run(backend), repeats)
            rows.append(Row(case.op, case.shape, backend, error, times[backend], 0.0))
        for row in rows:
            if row.op == case.op:
                row.speedup = times["torch"] / row.seconds
    return rows


def format_rows(rows: list[Row]) -> str:
    header = f"{'op':<17} {'shape':<38} {'backend':<8} {'rel.err':>9} {'ok':>4} {'median ms':>10} {'vs torch':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ok = "PASS" if r.error <= TOLERANCE else "FAIL"
        lines.append(
            f"{r.op:<17} {r.shape:<38} {r.backend:<8} {r.error:>9.1e} {ok:>4} {r.seconds * 1e3:>10.1f} {r.speedup:>8.2f}x"
        )
    return "\n".join(lines)


def all_passed(rows: list[Row]) -> bool:
    return all(r.error <= TOLERANCE for r in rows)
