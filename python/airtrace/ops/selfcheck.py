"""Kernel self-check (``airtrace selfcheck``): every op on every backend that runs here, its inputs on that backend's
device, judged by the error bound of ``airtrace.ops.bounds`` and timed; imports only the kernels layer.

Each backend gets its inputs where it computes: the CPU for "torch" and "cpu" (and "triton" under
TRITON_INTERPRET=1), the GPU for "cuda", "triton" and a second "torch" row when one is present.
The verdict of a row is ``err/bound``, the largest |result - float64 reference| over the bound of
that element (<= 1 passes); the speed is the median time and its ratio to "torch" on the same
device in the same run. The Triton interpreter (about 1000x slower than compiled Triton) is
checked on small shapes only and not timed against anything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from airtrace.ops import bounds
from airtrace.ops.backends import BACKENDS, BackendUnavailable, choose, triton_interpreted
from airtrace.ops.group_pool_scores import group_pool_scores
from airtrace.ops.precondition import precondition
from airtrace.ops.project_dense import project_dense
from airtrace.ops.project_factored import project_factored
from airtrace.ops.score_topk import score_topk

OPS = ("project_factored", "project_dense", "score_topk", "precondition", "group_pool_scores")


@dataclass
class Case:
    """One op call: its CPU inputs, how a backend runs it, and how a result is judged.

    Attributes:
        op: the op's name.
        shape: the sizes, for the table.
        inputs: the arguments as CPU tensors (and plain values); moved to each backend's device.
        run: ``run(backend, *inputs)`` calls the op.
        expected: the float64 reference and bound, from the CPU inputs.
        excess: ``excess(result, expected)``, the result's largest error over its bound.
    """

    op: str
    shape: str
    inputs: tuple
    run: Callable
    expected: Callable[[], bounds.Expected]
    excess: Callable[[object, bounds.Expected], float] = bounds.excess


@dataclass
class Row:
    op: str
    shape: str
    device: str
    backend: str
    excess: float
    seconds: float
    speedup: float | None  # t_torch / t_backend on the same device; None for the Triton interpreter

    @property
    def passed(self) -> bool:
        return self.excess <= 1.0


def _factors(k_out: int, k_in: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal Q_G (k_out, k_out), Q_A (k_in, k_in) and eigenvalues decaying over three decades, float32."""
    Q_G = torch.linalg.qr(torch.randn(k_out, k_out, generator=g, dtype=torch.float64))[0]
    Q_A = torch.linalg.qr(torch.randn(k_in, k_in, generator=g, dtype=torch.float64))[0]
    Lam = torch.rand(k_out, k_in, generator=g, dtype=torch.float64) * torch.logspace(0, -3, k_in, dtype=torch.float64)
    return Q_G.float(), Q_A.float(), Lam.float()


def _groups(n: int, count: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(0, count * size + 1, size), torch.randint(0, n, (count * size,), generator=g)


def cases(scale: int = 1, small: bool = False) -> list[Case]:
    """Every op once: realistic shapes times ``scale``, or (``small``) shapes the Triton interpreter runs in seconds.

    Inputs are float32 except score_topk's stored rows (bfloat16), as a store keeps them.
    """
    g = torch.Generator().manual_seed(0)
    if small:
        (B, T, d, kf), (Bd, p, kd), (q, n, k), (Bp, kp), (qp, np_, dp, Gp, size) = (
            (2, 40, 40, 20), (4, 130, 33), (5, 97, 33), (3, 17), (5, 120, 33, 6, 20))
    else:
        (B, T, d, kf), (Bd, p, kd), (q, n, k), (Bp, kp), (qp, np_, dp, Gp, size) = (
            (4 * scale, 64 * scale, 576, 32), (8, 50_000 * scale, 1024), (64, 20_000 * scale, 1024),
            (256 * scale, 32), (64, 20_000 * scale, 384, 2_000 * scale, 50))
    A, G = torch.randn(B, T, d, generator=g), torch.randn(B, T, d, generator=g)
    P_in, P_out = torch.randn(d, kf, generator=g) / d**0.5, torch.randn(d, kf, generator=g) / d**0.5
    mask = torch.rand(B, T, generator=g) > 0.2
    X_dense = torch.randn(Bd, p, generator=g)
    Q, X = torch.randn(q, k, generator=g), torch.randn(n, k, generator=g).bfloat16()
    G_hat, (Q_G, Q_A, Lam) = torch.randn(Bp, kp, kp, generator=g), _factors(kp, kp, g)
    Q_pool, X_pool = torch.randn(qp, dp, generator=g), torch.randn(np_, dp, generator=g)
    offsets, members = _groups(np_, Gp, size, g)
    damping, topk = 0.01, 10
    return [
        Case("project_factored", f"B={B} T={T} d={d} k={kf}x{kf} fp32", (A, G, P_in, P_out, mask),
             lambda b, *x: project_factored(*x, backend=b), lambda: bounds.project_factored(A, G, P_in, P_out, mask)),
        Case("project_dense", f"B={Bd} p={p} k={kd} gaussian", (X_dense,),
             lambda b, x: project_dense(x, kd, 7, "gaussian", backend=b),
             lambda: bounds.project_dense(X_dense, kd, 7, "gaussian")),
        Case("score_topk", f"q={q} n={n} k={k} bf16 top{topk}", (Q, X),
             lambda b, *x: score_topk(*x, topk, backend=b), lambda: bounds.scores(Q, X),
             lambda result, expected: bounds.topk_excess(*result, expected)),
        Case("precondition", f"B={Bp} k={kp}x{kp} fp32", (G_hat, Q_G, Q_A, Lam),
             lambda b, *x: precondition(*x, damping, backend=b),
             lambda: bounds.precondition(G_hat, Q_G, Q_A, Lam, damping)),
        Case("group_pool_scores", f"q={qp} n={np_} d={dp} G={Gp}x{size} fp32", (Q_pool, X_pool, offsets, members),
             lambda b, *x: group_pool_scores(*x, backend=b),
             lambda: bounds.group_pool_scores(Q_pool, X_pool, offsets, members)),
    ]


def backends_on(device: torch.device) -> list[str]:
    """The backends that run float32 inputs on ``device`` here, by the dispatcher's own rule."""
    names = []
    for name in BACKENDS:
        try:
            choose("selfcheck", name, device, torch.float32)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


def devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _interpreted(device: torch.device, backend: str) -> bool:
    """Triton on CPU tensors, which only the interpreter runs (backends_on admits it only then)."""
    return backend == "triton" and device.type == "cpu"


def _check(case: Case, expected: bounds.Expected, device: torch.device, backend: str, repeats: int) -> Row:
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in case.inputs)
    excess = case.excess(case.run(backend, *inputs), expected)
    timed = not _interpreted(device, backend)
    seconds = _median_seconds(lambda: case.run(backend, *inputs), repeats, device) if timed else math.nan
    return Row(case.op, case.shape, device.type, backend, excess, seconds, None)


def run(scale: int = 1, repeats: int = 3, quick: bool = False, progress: Callable[[str], None] = print) -> list[Row]:
    """Check (and time) every op on every backend of every device here; one Row per (op, shape, device, backend).

    Realistic shapes (times ``scale``) for every backend but the Triton interpreter, which gets the
    small shapes; ``quick``: the small shapes for every backend.
    """
    rows = []
    for small in (True,) if quick else (False, True):
        for case in cases(scale, small=small):
            expected = None
            for device in devices():
                names = [b for b in backends_on(device) if quick or _interpreted(device, b) == small]
                if not names:
                    continue
                if expected is None:
                    progress(f"checking {case.op} ({case.shape}) ...")
                    expected = case.expected()
                here = [_check(case, expected, device, b, repeats) for b in names]
                base = next((r.seconds for r in here if r.backend == "torch"), math.nan)
                for r in here:
                    r.speedup = None if math.isnan(r.seconds) or math.isnan(base) else base / r.seconds
                rows += here
    return rows


def format_rows(rows: list[Row]) -> str:
    header = (f"{'op':<17} {'shape':<36} {'device':<6} {'backend':<8} {'err/bound':>9} {'ok':>4} "
              f"{'median ms':>10} {'vs torch':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        ms = f"{'-':>10}" if math.isnan(r.seconds) else f"{r.seconds * 1e3:10.1f}"
        speed = f"{r.speedup:8.2f}x" if r.speedup is not None else f"{'interp.':>9}"
        lines.append(f"{r.op:<17} {r.shape:<36} {r.device:<6} {r.backend:<8} {r.excess:>9.2g} "
                     f"{'PASS' if r.passed else 'FAIL':>4} {ms} {speed}")
    return "\n".join(lines)


def all_passed(rows: list[Row]) -> bool:
    return bool(rows) and all(r.passed for r in rows)
