#!/usr/bin/env python
"""Benchmark of the airtrace kernels: project_factored, project_dense, score_topk, precondition, group_pool_scores.

Every compiled backend that can run here ("cpu"; "cuda" and "triton" on a GPU) is
timed against the pure-torch reference in the same run, plus the baselines the
targets are stated against: a random matrix materialised chunk by chunk in torch
(project_dense), a naive full-matrix top-k (score_topk peak memory) and, on GPU,
a cuBLAS matmul of the same FLOPs. See benches/README.md for the columns.

Targets (the constants below; ``--check`` exits with status 1 when one is missed):

- CPU, the variant picked automatically, t_torch / t_cpu: project_factored >= CPU_FACTORED (1.5),
  score_topk >= CPU_SCORE (1.5), group_pool_scores >= CPU_POOL (2); project_dense:
  t_materialised / t_cpu >= CPU_DENSE (3).
- GPU, t_kernel / t_cublas_same_flops (cuda and triton): <= GPU_X_GEMM (2) for project_factored,
  project_dense and score_topk; score_topk on bfloat16 with q >= 64: <= GPU_SCORE_X_GEMM (1.5);
  project_factored: t_kernel / t_batched_gemms (the op as torch.bmm in the input dtype)
  <= GPU_FACTORED_X_BATCHED (2).
- score_topk extra peak memory flat in n (every device): growth <= MEMORY_FLAT_SHARE (5%) of the
  naive top-k's growth, or MEMORY_NOISE_MIB (4 MiB).

    python benches/bench_ops.py --quick            # smoke pass, < 1 min, writes nothing
    python benches/bench_ops.py                    # full pass -> benches/results/<device>/bench_ops.csv
    python benches/bench_ops.py --device cuda --check   # the GPU rows; exit 1 on a missed target
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import airtrace  # noqa: E402

SECTIONS = ("factored", "dense", "score", "memory", "precondition", "pool")
COLUMNS = ("op", "shape", "dtype", "backend", "tensor_device", "median_ms", "repeats",
           "ratio_vs_ref", "ratio_vs_materialised", "x_gemm", "x_batched_gemm", "peak_extra_mib", "note")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOPK = 10
SEED = 1234
CPU_FACTORED, CPU_SCORE, CPU_POOL, CPU_DENSE = 1.5, 1.5, 2.0, 3.0
GPU_X_GEMM, GPU_SCORE_X_GEMM, GPU_SCORE_MIN_Q, GPU_FACTORED_X_BATCHED = 2.0, 1.5, 64, 2.0
MEMORY_FLAT_SHARE, MEMORY_NOISE_MIB = 0.05, 4.0


@dataclass
class Plan:
    """Shapes and repeat counts for one device in one mode (quick or full)."""

    repeats: int          # timed calls of the compiled backends and fast baselines
    slow_repeats: int     # timed calls of the slow torch baselines
    min_seconds: float    # ... and more fast calls until they add up to this (max 100)
    factored: list        # (B, T, d, k) with d_in = d_out = d, k_in = k_out = k
    dense: list           # (B, p, k, kind)
    dense_ref_entries: int  # the torch reference of project_dense is timed on about this many matrix entries
    score: list           # (n, q, k)
    memory_n: list        # growing n for the peak-memory table
    memory_qk: tuple      # (q, k) for the peak-memory table
    pool: list            # (q, n, d, G, group size) for group_pool_scores
    precondition: list    # (B, k_out, k_in)


def make_plan(device: str, quick: bool) -> Plan:
    if quick:
        return Plan(2, 1, 0.0, [(2, 16, 64, 8)], [(2, 8192, 64, "rademacher"), (2, 8192, 64, "gaussian")], 2**18,
                    [(2000, 8, 64)], [2000, 10000], (16, 32), [(16, 2000, 64, 100, 20)], [(64, 16, 16)])
    # 135M-LLM shapes: small batch/small k and large batch/large k at each (d, T) corner.
    factored = [(B, T, d, k) for d in (576, 1536) for T in (128, 512) for B, k in ((8, 16), (32, 64))]
    if device == "cpu":
        return Plan(5, 2, 1.0, factored,
                    [(8, 10**6, 1024, "rademacher"), (32, 10**6, 1024, "rademacher"), (8, 10**6, 1024, "gaussian")],
                    2**25,
                    [(10**5, 64, 1024), (10**5, 256, 1024), (10**5, 1024, 1024), (2 * 10**4, 256, 8192),
                     (10**6, 64, 1024)],
                    [2 * 10**4, 10**5, 5 * 10**5], (256, 256), [(256, 10**5, 384, 10**4, 100)],
                    [(1024, 16, 16), (256, 64, 64)])
    return Plan(10, 3, 1.0, factored,
                [(8, 10**6, 1024, "rademacher"), (32, 10**7, 1024, "rademacher"), (8, 10**7, 8192, "rademacher"),
                 (32, 10**7, 8192, "rademacher"), (8, 10**7, 8192, "gaussian")],
                2**25,
                [(n, q, 1024) for n in (10**5, 10**6) for q in (64, 256, 1024)] + [(10**6, q, 1024) for q in (1, 8)]
                + [(10**5, 256, 8192)],
                [10**5, 10**6, 4 * 10**6], (256, 256),
                [(256, 10**5, 384, 10**4, 100), (1024, 10**5, 384, 10**4, 100)],
                [(8192, 16, 16), (4096, 64, 64), (512, 256, 256)])


def sci(n: int) -> str:
    """1000000 -> '1e6', 20000 -> '2e4'; other numbers as they are."""
    exp = len(str(n)) - 1
    return f"{n // 10**exp}e{exp}" if n >= 10**4 and n % 10**exp == 0 else str(n)


def randn(*shape, dtype=torch.float32, device="cpu", seed=SEED) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, device=device, generator=gen)


def use_backend(label: str, select: bool = True) -> str:
    """The backend of a row label: "cpu-avx2" -> "cpu" (and, with ``select``, switch the CPU kernels
    to that instruction-set variant); other labels are backends themselves."""
    if not label.startswith("cpu-"):
        return label
    if select:
        from airtrace import _C

        _C.set_isa(label.removeprefix("cpu-"))
    return "cpu"


def cpu_variants() -> tuple[list[str], list[str]]:
    """Row labels of the cpu backend, one per variant this CPU runs ("cpu-generic", "cpu-avx2", ...),
    and a '# skipped' line for each built variant it cannot run."""
    from airtrace import _C

    labels, skipped = [], []
    for isa in _C.isas_built:
        try:
            _C.set_isa(isa)
            labels.append(f"cpu-{isa}")
        except ValueError as exc:
            skipped.append(f"# skipped backend 'cpu-{isa}': {exc}")
    _C.set_isa("auto")
    return labels, skipped


class Bench:
    """Times calls on one tensor device and collects result rows."""

    def __init__(self, device: str, backends: list[str], plan: Plan):
        self.device, self.backends, self.plan = device, backends, plan
        self.sync = C.sync_for(device)
        self.rows: list[dict] = []

    def time(self, fn, slow=False, warmup=1) -> tuple[float, int]:
        if slow:
            return C.median_time(fn, self.plan.slow_repeats, warmup, self.sync)
        return C.median_time(fn, self.plan.repeats, warmup, self.sync, min_seconds=self.plan.min_seconds)

    def add(self, op, shape, dtype, backend, ms, reps, **extra) -> dict:
        row = {"op": op, "shape": shape, "dtype": dtype, "backend": backend, "tensor_device": self.device,
               "median_ms": ms, "repeats": reps, **extra}
        self.rows.append(row)
        print(f"  {op:16s} {shape:34s} {dtype:5s} {backend:18s} {ms:10.2f} ms", flush=True)
        return row

    def gemm(self, op, shape, dtype, M, N, K, torch_dtype):
        """Time a cuBLAS matmul (M, K) @ (K, N) of the op's FLOPs.

        A right operand over 2^30 elements (p x k of project_dense) is one (kc, N) block reused
        for every chunk of K, accumulated with addmm.
        """
        kc = K if K * N <= 2**30 else max(1, 2**30 // N)
        a = randn(M, K, dtype=torch_dtype, device=self.device)
        b = randn(kc, N, dtype=torch_dtype, device=self.device, seed=SEED + 1)
        out = torch.zeros(M, N, dtype=torch_dtype, device=self.device)

        def run():
            if kc == K:
                return torch.mm(a, b, out=out)
            for s in range(0, K, kc):
                out.addmm_(a[:, s:s + kc], b[: min(kc, K - s)])

        ms, reps = self.time(run)
        self.add(op, shape, dtype, "cublas-gemm", ms, reps, note=f"matmul ({M}x{K}) @ ({K}x{N}), same FLOPs")
        return ms

    # ------------------------------------------------------------------ project_factored
    def factored(self):
        for dname, dtype in DTYPES.items():
            for B, T, d, k in self.plan.factored:
                A = randn(B, T, d, dtype=dtype, device=self.device)
                G = randn(B, T, d, dtype=dtype, device=self.device, seed=SEED + 1)
                P_in = randn(d, k, device=self.device, seed=SEED + 2) / math.sqrt(d)
                P_out = randn(d, k, device=self.device, seed=SEED + 3) / math.sqrt(d)
                shape = f"B={B} T={T} d={d} k={k}"
                t_ref, reps = self.time(lambda: airtrace.project_factored(A, G, P_in, P_out, backend="torch"))
                self.add("project_factored", shape, dname, "torch", t_ref, reps, ratio_vs_ref=1.0)
                t_gemm = t_batched = None
                if self.device == "cuda":  # (B*T, d) @ (d, k_in + k_out + k_in*k_out/d): the op's FLOPs
                    t_gemm = self.gemm("project_factored", shape, dname, B * T, 2 * k + round(k * k / d), d, dtype)
                    # the op as batched GEMMs in the input dtype: (G P_out)^T (A P_in) per sample
                    Pi, Po = P_in.to(dtype), P_out.to(dtype)
                    t_batched, reps = self.time(lambda: torch.bmm((G @ Po).transpose(1, 2), A @ Pi))
                    self.add("project_factored", shape, dname, "batched-gemm", t_batched, reps,
                             note="torch.bmm((G P_out)^T, A P_in) in the input dtype")
                for be in self.backends:
                    name = use_backend(be)
                    t, reps = self.time(lambda: airtrace.project_factored(A, G, P_in, P_out, backend=name))
                    self.add("project_factored", shape, dname, be, t, reps, ratio_vs_ref=t_ref / t,
                             x_gemm=t / t_gemm if t_gemm else None, x_batched_gemm=t / t_batched if t_batched else None)
                del A, G

    # ------------------------------------------------------------------ project_dense
    def dense(self):
        for B, p, k, kind in self.plan.dense:
            X = randn(B, p, device=self.device)
            shape = f"B={B} p={sci(p)} k={k} {kind}"
            # The reference materialises hash entries chunk by chunk (4096 rows): its time is
            # linear in p, so it is timed on the first p_sub rows and scaled to p.
            p_sub = min(p, max(4096, self.plan.dense_ref_entries // k // 4096 * 4096))
            airtrace.project_dense(X[:, :4096], k, SEED, kind, backend="torch")  # warm-up: one chunk
            t_sub, reps = self.time(lambda: airtrace.project_dense(X[:, :p_sub], k, SEED, kind, backend="torch"),
                                    slow=True, warmup=0)
            t_ref = t_sub * p / p_sub
            note = f"timed on {p_sub} rows, scaled x{p / p_sub:.3g}" if p_sub < p else ""
            self.add("project_dense", shape, "fp32", "torch", t_ref, reps, ratio_vs_ref=1.0, note=note)
            # What peer libraries do: torch.randn(chunk, k) chunk by chunk, then matmul.
            chunk = max(1, 2**24 // k)
            gen = torch.Generator(device=self.device)

            def materialised():
                gen.manual_seed(SEED)
                out = torch.zeros(B, k, device=self.device)
                for s in range(0, p, chunk):
                    R = torch.randn(min(chunk, p - s), k, device=self.device, generator=gen)
                    out.addmm_(X[:, s:s + chunk], R)
                return out.mul_(1 / math.sqrt(k))

            t_mat, reps = self.time(materialised, slow=True, warmup=0)  # one call is many chunks
            self.add("project_dense", shape, "fp32", "torch-materialised", t_mat, reps,
                     ratio_vs_ref=t_ref / t_mat, ratio_vs_materialised=1.0, note=f"torch.randn({chunk}, {k}) chunks")
            t_gemm = self.gemm("project_dense", shape, "fp32", B, k, p, torch.float32) if self.device == "cuda" else None
            for be in self.backends:
                name = use_backend(be)
                t, reps = self.time(lambda: airtrace.project_dense(X, k, SEED, kind, backend=name))
                self.add("project_dense", shape, "fp32", be, t, reps, ratio_vs_ref=t_ref / t,
                         ratio_vs_materialised=t_mat / t, x_gemm=t / t_gemm if t_gemm else None)
            del X

    # ------------------------------------------------------------------ score_topk
    def score(self):
        for dname, dtype in DTYPES.items():
            for n, q, k in self.plan.score:
                X = randn(n, k, dtype=dtype, device=self.device)
                Q = randn(q, k, dtype=dtype, device=self.device, seed=SEED + 1)
                shape = f"n={sci(n)} q={q} k={k} topk={TOPK}"
                t_ref, reps = self.time(lambda: airtrace.score_topk(Q, X, TOPK, backend="torch"), slow=True)
                self.add("score_topk", shape, dname, "torch", t_ref, reps, ratio_vs_ref=1.0)
                t_gemm = self.gemm("score_topk", shape, dname, q, n, k, dtype) if self.device == "cuda" else None
                for be in self.backends:
                    name = use_backend(be)
                    t, reps = self.time(lambda: airtrace.score_topk(Q, X, TOPK, backend=name))
                    self.add("score_topk", shape, dname, be, t, reps, ratio_vs_ref=t_ref / t,
                             x_gemm=t / t_gemm if t_gemm else None)
                del X, Q

    # ------------------------------------------------------------------ group_pool_scores
    def pool(self):
        for dname, dtype in DTYPES.items():
            for q, n, d, G, size in self.plan.pool:
                X = randn(n, d, dtype=dtype, device=self.device)
                Q = randn(q, d, dtype=dtype, device=self.device, seed=SEED + 1)
                gen = torch.Generator(device=self.device).manual_seed(SEED + 2)
                members = torch.randint(0, n, (G * size,), generator=gen, device=self.device)
                offsets = torch.arange(0, G * size + 1, size, device=self.device)
                shape = f"q={q} n={sci(n)} d={d} G={sci(G)}x{size}"
                t_ref, reps = self.time(lambda: airtrace.group_pool_scores(Q, X, offsets, members, backend="torch"), slow=True)
                self.add("group_pool_scores", shape, dname, "torch", t_ref, reps, ratio_vs_ref=1.0)
                # the member dot products as one dense matmul: (q, d) @ (d, G * size)
                t_gemm = self.gemm("group_pool_scores", shape, dname, q, G * size, d, dtype) if self.device == "cuda" else None
                for be in self.backends:
                    name = use_backend(be)
                    t, reps = self.time(lambda: airtrace.group_pool_scores(Q, X, offsets, members, backend=name))
                    self.add("group_pool_scores", shape, dname, be, t, reps, ratio_vs_ref=t_ref / t,
                             x_gemm=t / t_gemm if t_gemm else None)
                del X, Q, members

    # ------------------------------------------------------------------ precondition
    def precondition(self):
        for B, k_out, k_in in self.plan.precondition:
            gen = torch.Generator().manual_seed(SEED)
            Q_G = torch.linalg.qr(torch.randn(k_out, k_out, generator=gen, dtype=torch.float64))[0].float()
            Q_A = torch.linalg.qr(torch.randn(k_in, k_in, generator=gen, dtype=torch.float64))[0].float()
            Q_G, Q_A = Q_G.to(self.device), Q_A.to(self.device)
            Lam = torch.rand(k_out, k_in, generator=gen).to(self.device)
            G_hat = randn(B, k_out, k_in, device=self.device)
            shape = f"B={B} k={k_out}x{k_in}"
            t_ref, reps = self.time(lambda: airtrace.precondition(G_hat, Q_G, Q_A, Lam, 0.01, backend="torch"))
            self.add("precondition", shape, "fp32", "torch", t_ref, reps, ratio_vs_ref=1.0)
            # four products per sample, 2 B k_out k_in (2 k_out + 2 k_in) FLOPs: (B k_out, k_in) @ (k_in, 2 (k_out + k_in))
            t_gemm = (self.gemm("precondition", shape, "fp32", B * k_out, 2 * (k_out + k_in), k_in, torch.float32)
                      if self.device == "cuda" else None)
            for be in self.backends:
                name = use_backend(be)
                t, reps = self.time(lambda: airtrace.precondition(G_hat, Q_G, Q_A, Lam, 0.01, backend=name))
                self.add("precondition", shape, "fp32", be, t, reps, ratio_vs_ref=t_ref / t,
                         x_gemm=t / t_gemm if t_gemm else None)
            del G_hat

    # ------------------------------------------------------------------ score_topk peak memory
    def memory(self):
        q, k = self.plan.memory_qk
        for n in self.plan.memory_n:
            for method in [*dict.fromkeys(use_backend(be, select=False) for be in self.backends), "naive"]:
                args = {"method": method, "n": n, "q": q, "k": k, "device": self.device}
                note = f"q*n*4 = {q * n * 4 / C.MIB:.1f} MiB" if method == "naive" else ""
                if self.device == "cuda":
                    extra = C.cuda_peak_extra(memory_case(**args))
                else:
                    res = C.peak_rss_subprocess(Path(__file__), "memory_case", args)
                    extra = res["extra_bytes"]
                    if res["masked"]:
                        note = (note + "; " if note else "") + "peak reached before the call: upper bound"
                shape = f"n={sci(n)} q={q} k={k} topk={TOPK}"
                backend = "naive torch.topk(Q@X.T)" if method == "naive" else method
                self.rows.append({"op": "score_topk_mem", "shape": shape, "dtype": "fp32", "backend": backend,
                                  "tensor_device": self.device, "peak_extra_mib": extra / C.MIB, "note": note})
                print(f"  {'score_topk_mem':16s} {shape:34s} fp32  {backend:24s} {extra / C.MIB:10.2f} MiB", flush=True)


def memory_case(method: str, n: int, q: int, k: int, device: str = "cpu"):
    """Build (q, k) and (n, k) fp32 inputs and return the call whose peak memory is measured.

    Inputs come straight from randn (no temporaries, so the RSS high-water mark before the
    call is the inputs themselves); one call on a slice warms up threads and allocator first.
    """
    Q, X = randn(q, k, device=device, seed=SEED + 1), randn(n, k, device=device)
    if method == "naive":
        def fn(x):
            return torch.topk(Q @ x.T, TOPK, dim=1)
    else:
        def fn(x):
            return airtrace.score_topk(Q, x, TOPK, backend=method)
    fn(X[: min(n, 1024)])
    return lambda: fn(X)


# ---------------------------------------------------------------------- targets

def _check(label, items, goal, higher_is_better=True) -> str:
    """items: (value, where); the worst value decides PASS/MISS."""
    if not items:
        return C.target(label, None, goal, higher_is_better)
    worst = min(items) if higher_is_better else max(items)
    med = statistics.median(v for v, _ in items)
    return C.target(label, worst[0], goal, higher_is_better,
                    f" worst ({worst[1]}), median {med:.2f}x over {len(items)}")


def _memory_check(rows, device) -> list[str]:
    mem = [r for r in rows if r["op"] == "score_topk_mem" and r["tensor_device"] == device]
    by = {}
    for r in mem:
        by.setdefault(r["backend"], {})[r["shape"]] = r["peak_extra_mib"]
    naive = next((v for b, v in by.items() if b.startswith("naive")), None)
    lines = []
    for backend, vals in by.items():
        if backend.startswith("naive") or len(vals) < 2:
            continue
        shapes = list(vals)  # insertion order: growing n
        lo, hi = vals[shapes[0]], vals[shapes[-1]]
        naive_growth = (naive[shapes[-1]] - naive[shapes[0]]) if naive else float("nan")
        allowed = max(MEMORY_FLAT_SHARE * naive_growth, MEMORY_NOISE_MIB)
        n_lo, n_hi = shapes[0].split()[0], shapes[-1].split()[0]
        naive_txt = f"; naive {naive[shapes[0]]:.1f} -> {naive[shapes[-1]]:.1f} MiB" if naive else ""
        lines.append(C.target(f"score_topk[{backend}] extra peak memory growth (MiB) {n_lo} -> {n_hi}", hi - lo,
                              allowed, higher_is_better=False, detail=f" ({lo:.1f} -> {hi:.1f} MiB{naive_txt})"))
    return lines or [C.target("score_topk peak memory flat in n", None, 0)]


def variant_summary(rows: list[dict]) -> list[str]:
    """Per op and CPU variant: t_torch / t_variant over the op's cases (median, min, max)."""
    lines = []
    for op in ("project_factored", "project_dense", "score_topk", "precondition", "group_pool_scores"):
        labels = dict.fromkeys(r["backend"] for r in rows if r["op"] == op and r["backend"].startswith("cpu-"))
        for label in labels:
            ratios = [r["ratio_vs_ref"] for r in rows if r["op"] == op and r["backend"] == label]
            lines.append(f"{op:17s} {label:11s} t_torch/t_variant median {statistics.median(ratios):6.2f}x "
                         f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x) over {len(ratios)} cases")
    return lines


def targets(rows: list[dict], quick: bool) -> list[str]:
    def items(op, backend, key, device, keep=lambda r: True):
        return [(r[key], f"{r['shape']} {r['dtype']}") for r in rows
                if r["op"] == op and r["backend"] == backend and r["tensor_device"] == device
                and r.get(key) is not None and keep(r)]

    lines = []
    if any(r["tensor_device"] == "cpu" for r in rows):
        from airtrace import _C

        cpu = f"cpu-{_C.isas_available[-1]}"  # the variant that backend "cpu" runs here by default
        lines += [
            _check(f"{cpu} project_factored  t_torch/t_cpu", items("project_factored", cpu, "ratio_vs_ref", "cpu"),
                   CPU_FACTORED),
            _check(f"{cpu} score_topk        t_torch/t_cpu", items("score_topk", cpu, "ratio_vs_ref", "cpu"), CPU_SCORE),
            _check(f"{cpu} group_pool_scores t_torch/t_cpu", items("group_pool_scores", cpu, "ratio_vs_ref", "cpu"),
                   CPU_POOL),
            _check(f"{cpu} project_dense     t_materialised/t_cpu",
                   items("project_dense", cpu, "ratio_vs_materialised", "cpu"), CPU_DENSE),
            *_memory_check(rows, "cpu"),
        ]
    if any(r["tensor_device"] == "cuda" for r in rows):
        def wide_bf16(r):
            return r["dtype"] == "bf16" and int(r["shape"].split("q=")[1].split()[0]) >= GPU_SCORE_MIN_Q

        for be in ("cuda", "triton"):
            if any(r["backend"] == be for r in rows):
                for op in ("project_factored", "project_dense", "score_topk"):
                    lines.append(_check(f"{be} {op:16s} t_kernel/t_cublas_same_flops",
                                        items(op, be, "x_gemm", "cuda"), GPU_X_GEMM, higher_is_better=False))
                lines.append(_check(f"{be} score_topk bf16 q>={GPU_SCORE_MIN_Q} t_kernel/t_cublas_same_flops",
                                    items("score_topk", be, "x_gemm", "cuda", wide_bf16), GPU_SCORE_X_GEMM,
                                    higher_is_better=False))
                lines.append(_check(f"{be} project_factored t_kernel/t_batched_gemms",
                                    items("project_factored", be, "x_batched_gemm", "cuda"), GPU_FACTORED_X_BATCHED,
                                    higher_is_better=False))
        lines += _memory_check(rows, "cuda")
    if quick:
        lines.append("n/a   (--quick: tiny shapes, the figures above are a smoke test, not results)")
    return lines


# ---------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke pass: tiny shapes, 1-2 repeats, < 1 minute")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for bench_ops.csv (default benches/results/<device-slug>/; "
                             "--quick writes nothing unless --out is given)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, from {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="tensor devices to benchmark (auto: cpu, plus cuda when a GPU is present)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="time each fast call until the timed calls add up to this (default: 1 s, --quick 0)")
    C.add_check_flag(parser)
    args = parser.parse_args(argv)
    if args.min_seconds is not None and args.min_seconds < 0:
        parser.error(f"--min-seconds must be >= 0, got {args.min_seconds}")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad or not args.only:
        parser.error(f"--only: unknown section(s) {bad or args.only!r}; choose from {', '.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here (torch.cuda.is_available() is False)")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: {args.out} exists and is not a folder")
    return args


def backend_groups(device_arg: str) -> tuple[dict[str, list[str]], list[str]]:
    """{tensor device: compiled backends to time there}, and a line per skipped backend."""
    devices = ["cpu"] if device_arg == "cpu" else ["cuda"] if device_arg == "cuda" else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    groups, skipped = {d: [] for d in devices}, []
    for be in ("cpu", "cuda", "triton"):
        dev = "cpu" if be == "cpu" else "cuda"
        reason = airtrace.unavailable_reason(be)
        if reason is None and be == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            reason = "TRITON_INTERPRET=1: the CPU interpreter is ~1000x slower than compiled Triton; not benchmarked"
        elif reason is None and dev not in groups:
            reason = f"--device {device_arg}"
        if reason:
            skipped.append(f"# skipped backend {be!r}: {reason}")
        elif be == "cpu":
            labels, not_run = cpu_variants()
            groups[dev] += labels
            skipped += not_run
        else:
            groups[dev].append(be)
    return groups, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    groups, skipped = backend_groups(args.device)
    head = C.header(gpu="cuda" in groups)
    C.print_header(head, "airtrace bench_ops" + (" --quick" if args.quick else ""))
    for line in skipped:
        print(line)
    rows = []
    for device, backends in groups.items():
        print(f"# tensors on {device}: torch reference vs {', '.join(backends) or '(no compiled backend)'}", flush=True)
        plan = make_plan(device, args.quick)
        if args.min_seconds is not None:
            plan.min_seconds = args.min_seconds
        bench = Bench(device, backends, plan)
        for section in args.only:
            getattr(bench, section)()
        rows += bench.rows

    for op in ("project_factored", "project_dense", "score_topk", "score_topk_mem", "precondition",
               "group_pool_scores"):
        sel = [r for r in rows if r["op"] == op]
        if sel:
            C.print_table(sel, COLUMNS, title=op)
    if any(r["backend"].startswith("cpu-") for r in rows):
        print("\n## CPU variants vs the torch reference")
        for line in variant_summary(rows):
            print(line)
    status = C.report_targets(targets(rows, args.quick), args.check)

    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        path = C.write_csv(out / "bench_ops.csv", rows, COLUMNS, head)
        print(f"\n# wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
