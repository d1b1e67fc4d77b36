#!/usr/bin/env python
"""End to end on one GPU: a randomly initialised ~1B-parameter Llama-family model built from a config (no download).

- ``bare``: the model's forward + backward (weight gradients, no optimizer) over the batches: tokens/s.
- ``featurize``: LoGra k_in = k_out = 16 on every nn.Linear (the 7 projections of each block and lm_head), EK-FAC
  curvature (so the K-FAC factors are summed during the same passes): tokens/s and its overhead over ``bare``.
- ``fit``: EK-FAC from the store (eigendecompositions + the eigenvalue correction pass over the features): seconds.
- ``score``: the queries against the store (top-10, inner product): rows/s. Scoring a 10^7-row store is
  ``bench_score_large.py --device cuda --rows 10000000 --width 256 --queries 64 --rows-per-shard 65536``
  (``make gpu-check`` runs both).

Target (``--check`` exits with status 1 when it is missed): featurize at most FEATURIZE_OVERHEAD (15%) slower than the
bare forward + backward.

    python benches/bench_gpu_e2e.py                      # ~1.0B parameters, 256 sequences of 512 tokens
    python benches/bench_gpu_e2e.py --quick --device cpu --layers 1 --width 256 --vocab 512   # smoke pass on a CPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from airtrace import Attributor  # noqa: E402
from airtrace.capture import per_example_loss  # noqa: E402

FEATURIZE_OVERHEAD = 0.15
COLUMNS = ("stage", "params", "examples", "tokens", "seconds", "tokens_per_s", "rows_per_s", "overhead", "note")


class Block(nn.Module):
    """Pre-norm Llama block: RMSNorm, grouped-query attention with rotary positions, RMSNorm, SwiGLU MLP."""

    def __init__(self, d: int, heads: int, kv_heads: int, hidden: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.attn_norm(x)

        def heads(t, n):
            t = t.view(B, T, n, self.head_dim).transpose(1, 2)
            half = self.head_dim // 2
            rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
            return t * cos + rotated * sin

        q, k = heads(self.q_proj(h), self.heads), heads(self.k_proj(h), self.kv_heads)
        v = self.v_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(o.transpose(1, 2).reshape(B, T, d))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, kv_heads: int, hidden: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, kv_heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        head_dim = d // heads
        freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.embed(input_ids)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B,) next-token cross-entropy of each sequence."""
    return per_example_loss(model(batch["input_ids"]), batch["input_ids"], "causal_lm")


def make_batches(n: int, batch: int, seq: int, vocab: int, prefix: str, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [([f"{prefix}{i + j}" for j in range(min(batch, n - i))],
             {"input_ids": torch.randint(0, vocab, (min(batch, n - i), seq), generator=g)}) for i in range(0, n, batch)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20, help="decoder blocks (default 20: 1.0B parameters)")
    parser.add_argument("--examples", type=int, default=256, help="training sequences (default 256)")
    parser.add_argument("--queries", type=int, default=16, help="query sequences (default 16)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--width", type=int, default=2048, help="model width d (default 2048; MLP 2.75 d)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default cuda (cpu: smoke pass)")
    parser.add_argument("--quick", action="store_true", help="32 sequences of 128 tokens; writes nothing")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_gpu_e2e.csv (default results/<gpu>/)")
    C.add_check_flag(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here (torch.cuda.is_available() is False)")
    if args.quick:
        args.examples, args.queries, args.seq = 32, 4, 128
    device = torch.device(args.device)
    sync = C.sync_for(device)
    head = C.header(gpu=device.type == "cuda")
    C.print_header(head, "airtrace bench_gpu_e2e" + (" --quick" if args.quick else ""))
    vocab = args.vocab
    torch.manual_seed(0)
    with device:
        model = Llama(vocab, args.width, args.layers, 32, 4, args.width * 11 // 4, args.seq).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    print(f"# model     Llama-style, {args.layers} blocks, d {args.width}, 32 heads (4 kv), MLP {args.width * 11 // 4}, "
          f"vocab {vocab}: "
          f"{params / 1e9:.2f}B parameters, bfloat16", flush=True)
    train = make_batches(args.examples, args.batch, args.seq, vocab, "t", 1)
    queries = make_batches(args.queries, args.batch, args.seq, vocab, "q", 2)
    tokens = args.examples * args.seq
    rows = []

    def bare():
        for _, batch in train:
            model.zero_grad(set_to_none=True)
            loss_fn(model, {"input_ids": batch["input_ids"].to(device)}).sum().backward()
        sync()

    bare()  # warm-up: kernels, allocator
    start = time.perf_counter()
    bare()
    t_bare = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    rows.append({"stage": "bare", "params": params, "examples": args.examples, "tokens": tokens, "seconds": t_bare,
                 "tokens_per_s": tokens / t_bare, "note": "forward + backward with weight gradients"})
    at = Attributor(model, "*", loss_fn=loss_fn, projection=dict(k_in=16, k_out=16, seed=0), curvature="ekfac",
                    device=device)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-e2e-") as tmp:
        at.featurize(train[:1], Path(tmp) / "warm", progress=False)
        sync()
        start = time.perf_counter()
        store = at.featurize(train, Path(tmp) / "store", total=args.examples, progress=False)
        sync()
        t_feat = time.perf_counter() - start
        rows.append({"stage": "featurize", "params": params, "examples": args.examples, "tokens": tokens,
                     "seconds": t_feat, "tokens_per_s": tokens / t_feat, "overhead": t_feat / t_bare - 1,
                     "note": f"{len(at.layers)} layers, width {at.width}, bfloat16 store, K-FAC sums"})
        start = time.perf_counter()
        at.fit(train, Path(tmp) / "curvature.safetensors", store=store, total=args.examples, progress=False)
        rows.append({"stage": "fit", "params": params, "examples": args.examples, "seconds": time.perf_counter() - start,
                     "note": "EK-FAC from the featurize K-FAC sums + the eigenvalue correction over the store"})
        start = time.perf_counter()
        at.score(queries, store, topk=10, progress=False)
        sync()
        t_score = time.perf_counter() - start
        rows.append({"stage": "score", "params": params, "examples": args.examples, "seconds": t_score,
                     "rows_per_s": args.examples / t_score,
                     "note": f"{args.queries} queries (their featurize included), top-10 inner product"})
    C.print_table(rows, COLUMNS)
    feat = rows[1]
    status = C.report_targets([C.target("featurize time / bare forward+backward time - 1", feat["overhead"],
                                        FEATURIZE_OVERHEAD, higher_is_better=False)], args.check)
    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        print(f"\n# wrote {C.write_csv(out / 'bench_gpu_e2e.csv', rows, COLUMNS, head)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
