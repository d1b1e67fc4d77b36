#!/usr/bin/env python
"""End-to-end pipeline benchmark on the CPU: airtrace vs plain torch vs peer libraries, same run.

Sections (see benches/README.md, "bench_pipeline"):

- ``featurize``: per-example LoGra features (k_in = k_out = 16 on the demo's 42 layers of
  SmolLM2-135M-Instruct, chatterbot pairs) with airtrace, a plain-torch implementation of the
  same math, LogIX and bergson: examples/s, tokens/s, and peak memory at two dataset sizes.
- ``ekfac``: LoGra + EK-FAC influence of the demo queries on n training pairs, airtrace
  (featurize + fit + score) vs kronfluence (fit_all_factors + compute_pairwise_scores, in the
  unprojected layer space): wall time, peak memory, per-query Spearman between the two.
- ``score``: streamed top-k scoring of q queries over a synthetic store of 10^6 rows x 1024
  (bfloat16 shards on disk): airtrace ``stream_scores`` vs plain torch (load shard, matmul,
  topk, merge), rows/s and peak memory at two store sizes.
- cross-check (part of ``featurize``): identity-curvature scores (query x train inner products)
  of every method against the exact unprojected gradient inner products, per-query Spearman.

Every measurement runs in a fresh interpreter (peak memory = VmHWM minus the RSS after setup
and a warm-up forward/backward). A peer that does not import here gets a ``SKIPPED <peer>:
<reason>`` row. Run it with the peer venv (benches/setup_peers.sh):

    .venv-peers/bin/python benches/bench_pipeline.py --quick   # smoke pass, writes nothing
    .venv-peers/bin/python benches/bench_pipeline.py           # -> benches/results/<device>/bench_pipeline.csv

Targets (the constants below; ``--check`` exits with status 1 when one is missed): featurize
examples/s >= FEATURIZE_VS_BEST_PEER (1.5) x the best peer's (the ratio is also shown against
FEATURIZE_STRETCH (2), a reported figure, not a target); every method's featurize peak memory
flat in n (growth from the smallest size to any larger one <= MEMORY_FLAT_SHARE (10%) of the smallest
size's, or MEMORY_FLAT_MIB (32 MiB)), with ``--pad-to-max`` at one fixed batch shape;
the EK-FAC pipeline >= EKFAC_VS_KRONFLUENCE (2) x faster than kronfluence; scoring's peak memory
<= SHARD_BOUND (4) shards at every store size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES))
import _common as C  # noqa: E402

SECTIONS = ("featurize", "ekfac", "score")
FEATURIZERS = ("airtrace", "torch", "logix", "bergson")
PEERS = ("logix", "bergson", "kronfluence", "traker", "dattri")
FEATURIZE_VS_BEST_PEER = 1.5
FEATURIZE_STRETCH = 2.0
MEMORY_FLAT_SHARE, MEMORY_FLAT_MIB = 0.10, 32.0
EKFAC_VS_KRONFLUENCE = 2.0
COLUMNS = ("section", "method", "n", "seconds", "examples_per_s", "tokens_per_s", "rows_per_s",
           "peak_extra_mib", "ratio_vs_airtrace", "spearman", "note")
TOPK = 10
SCORE_K = 1024
SCORE_Q = 64
ROWS_PER_SHARD = 16384
SHARD_MIB = ROWS_PER_SHARD * SCORE_K * 2 / 2**20  # one bfloat16 shard of the synthetic scoring store
# The streamed reader keeps the shard being scored, the one the loop variable still holds while the
# next is fetched, and one prefetched (prefetch=1): three shards, plus the score tile and a margin.
SHARD_BOUND = 4

NOTES = {
    "airtrace": "Attributor.featurize: hooks + compiled project_factored, float32 store on disk",
    "torch": "plain torch: hooks, per-example einsum outer product (B,d_out,d_in), then P_out^T g P_in (same P)",
    "logix": "LogIX 0.1.1 LoGra: random LoRA rank-16 encoder/decoder, per-example bottleneck grads, mmap logs",
    "bergson": "bergson 2.5.1 collect_gradients, projection_dim=16 per module (Gaussian), index on disk",
}


# --------------------------------------------------------------------------- children


def _status(field: str) -> int:
    return C._status_bytes(field)


def _measured(call) -> dict:
    """Reset the peak-RSS mark, run ``call`` once; seconds and peak memory added."""
    C._reset_peak()
    base = _status("VmRSS")
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_bytes": _status("VmHWM") - base, "base_bytes": base, "result": result}


def child_featurize(method: str, n: int, workdir: str, keep: bool, pad_to_max: bool = False) -> dict:
    from peers import lm

    setup = lm.make_setup(n, with_queries=True, pad_to_max=pad_to_max)
    lm.warm_up(setup)
    out = _measured(lambda: lm.FEATURIZE[method](setup, workdir))
    if keep:  # features for the cross-check, read back (not timed)
        reader = {"airtrace": lambda: lm.read_airtrace(workdir), "torch": lambda: lm.read_torch(workdir),
                  "logix": lambda: lm.read_logix(workdir, setup), "bergson": lambda: lm.read_bergson(workdir, setup)}
        ids, X = reader[method]()
        torch.save({"ids": ids, "features": X}, os.path.join(workdir, "features.pt"))
    out.pop("result")
    return {**out, "examples": setup.n_examples, "tokens": setup.n_tokens}


def child_exact(n: int, path: str) -> dict:
    from peers import lm

    setup = lm.make_setup(n, with_queries=True)
    n_queries = len(setup.batches[0][0])
    ids = [i for batch_ids, _ in setup.batches for i in batch_ids]
    torch.save({"ids": ids, "n_queries": n_queries, "scores": lm.exact_inner_products(setup, n_queries)}, path)
    return {}


def child_ekfac(method: str, n: int, path: str) -> dict:
    from peers import lm

    setup = lm.make_setup(n, with_queries=True)
    n_queries = len(setup.batches[0][0])
    lm.warm_up(setup)
    workdir = tempfile.mkdtemp(prefix=f"ekfac-{method}-", dir=os.path.dirname(path))
    fn = lm.ekfac_airtrace if method == "airtrace" else lm.ekfac_kronfluence
    out = _measured(lambda: fn(setup, workdir, n_queries))
    torch.save(out.pop("result"), path)
    return {**out, "examples": setup.n_examples - n_queries}


def child_score(method: str, store_path: str, seed: int) -> dict:
    from airtrace.scoring import stream_scores
    from airtrace.store import Store

    store = Store.open(store_path)
    gen = torch.Generator().manual_seed(seed)
    Q = torch.randn(SCORE_Q, store.width, generator=gen)
    if method == "airtrace":
        def call():
            return stream_scores(Q, store, topk=TOPK, progress=False)
    else:
        from safetensors.torch import load_file

        def call():  # plain torch: read each shard, upcast, matmul, topk, merge
            values = torch.full((SCORE_Q, TOPK), float("-inf"))
            indices = torch.full((SCORE_Q, TOPK), -1, dtype=torch.int64)
            for info in store.shards:
                X = load_file(os.path.join(store_path, info.file))["features"].float()
                v, i = torch.topk(Q @ X.T, min(TOPK, X.shape[0]), dim=1)
                values, order = torch.topk(torch.cat([values, v], 1), TOPK, dim=1)
                indices = torch.gather(torch.cat([indices, i + info.row_start], 1), 1, order)
            return values, indices

    first = store.shards[0]  # warm-up: one shard's worth of matmul + topk (threads, allocator)
    torch.topk(Q @ torch.randn(first.row_end - first.row_start, store.width).T, TOPK, dim=1)
    out = _measured(call)
    values, indices = out.pop("result")
    torch.save({"values": values, "indices": indices}, store_path + f".{method}.pt")
    return {**out, "rows": len(store)}


def run_child(kind: str, timeout: float = 3600, env: dict[str, str] | None = None, **kwargs) -> dict:
    """Run one measurement in a fresh interpreter (``env``: variables added to this process's environment)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(kwargs)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir(),
                         env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise RuntimeError(f"child {kind} {kwargs} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def child_main(kind: str, kwargs_json: str) -> None:
    kwargs = json.loads(kwargs_json)
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    result = {"featurize": child_featurize, "exact": child_exact, "ekfac": child_ekfac,
              "score": child_score}[kind](**kwargs)
    print(json.dumps(result))


# --------------------------------------------------------------------------- sections


def available_peers(rows: list[dict]) -> dict[str, str | None]:
    """{peer: version, or None when it cannot run here}; a SKIPPED row (printed and in ``rows``) for each missing one."""
    found = {}
    for peer in PEERS:
        reason = C.peer_unavailable(peer)
        found[peer] = None if reason else _dist_version(peer)
        if reason:
            rows.append({"section": "peers", "method": peer, "note": C.skipped(peer, reason)})
    return found


def _dist_version(peer: str) -> str:
    import importlib.metadata as md

    for dist in (peer, f"{peer}-ai"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            pass
    return "installed"


# The memory check's children hold glibc's mmap threshold at its initial 128 KiB: by default glibc raises it
# (up to 32 MiB) each time a large block is freed, after which large tensors come from the heap, whose
# fragments stay resident, so the peak RSS grows with the number of batches even when nothing is kept.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def featurize_section(sizes: list[int], methods: list[str], repeats: int, tmp: Path, rows: list[dict],
                      pad_to_max: bool = False) -> None:
    print(f"# featurize: n in {sizes} (+ the 6 demo queries), methods {methods}", flush=True)
    big = sizes[-1]
    for n in sizes:
        # at the largest size every method runs `repeats` times, in alternating order (load drifts);
        # the fastest run is kept
        order = [m for r in range(repeats if n == big else 1) for m in (methods if r % 2 == 0 else methods[::-1])]
        best: dict[str, dict] = {}
        for run, method in enumerate(order):
            workdir = tmp / f"feat-{method}-{n}-{run}"
            workdir.mkdir()
            r = run_child("featurize", method=method, n=n, workdir=str(workdir), keep=n == big and not pad_to_max,
                          pad_to_max=pad_to_max, env=FIXED_MMAP_THRESHOLD if pad_to_max else None)
            row = {"section": "featurize-fixed-shape" if pad_to_max else "featurize", "method": method,
                   "n": r["examples"], "seconds": r["seconds"],
                   "examples_per_s": r["examples"] / r["seconds"], "tokens_per_s": r["tokens"] / r["seconds"],
                   "peak_extra_mib": r["extra_bytes"] / C.MIB, "note": NOTES[method], "workdir": workdir}
            print(f"  featurize {method:9s} n={r['examples']:4d} {r['seconds']:8.1f} s  "
                  f"{row['examples_per_s']:7.2f} ex/s  {row['tokens_per_s']:8.1f} tok/s  "
                  f"peak +{row['peak_extra_mib']:.0f} MiB  (load {_load()})", flush=True)
            if method not in best or row["seconds"] < best[method]["seconds"]:
                if method in best:
                    row["peak_extra_mib"] = max(row["peak_extra_mib"], best[method]["peak_extra_mib"])
                best[method] = row
            else:
                best[method]["peak_extra_mib"] = max(row["peak_extra_mib"], best[method]["peak_extra_mib"])
        runs = order.count(methods[0])
        for method in methods:
            if runs > 1:
                best[method]["note"] += f"; fastest of {runs} runs (peak memory: the largest)"
            rows.append(best[method])
    section = "featurize-fixed-shape" if pad_to_max else "featurize"
    measured = [row for row in rows if row["section"] == section]
    for row in measured:
        ref = next((r for r in measured if r["method"] == "airtrace" and r["n"] == row["n"]), None)
        if ref:
            row["ratio_vs_airtrace"] = ref["examples_per_s"] / row["examples_per_s"]
    if not pad_to_max:
        crosscheck(big, methods, tmp, rows)


def crosscheck(n: int, methods: list[str], tmp: Path, rows: list[dict]) -> None:
    """Identity scores (query x train inner products of the features) vs the exact gradient inner products."""
    from peers.lm import per_query_spearman

    exact_path = tmp / "exact.pt"
    run_child("exact", n=n, path=str(exact_path))
    exact = torch.load(exact_path)
    nq, ids = exact["n_queries"], exact["ids"]
    feats = {}
    for method in methods:
        workdir = next(r["workdir"] for r in rows if r["section"] == "featurize" and r["method"] == method
                       and r["n"] == max(x["n"] for x in rows if x["section"] == "featurize"))
        saved = torch.load(workdir / "features.pt")
        order = {i: j for j, i in enumerate(saved["ids"])}
        feats[method] = saved["features"][[order[i] for i in ids]].double()
    print(f"# cross-check on n={len(ids) - nq}, {nq} queries: per-query Spearman of identity scores", flush=True)
    for method in methods:
        X = feats[method]
        S = X[:nq] @ X[nq:].T
        rho = per_query_spearman(S, exact["scores"])
        rows.append({"section": "crosscheck", "method": method, "n": len(ids) - nq, "spearman": float(rho.mean()),
                     "note": "vs exact unprojected inner products; per query: "
                             + " ".join(f"{v:.2f}" for v in rho.tolist())})
        print(f"  {method:9s} vs exact: mean {rho.mean():.3f}  min {rho.min():.3f}", flush=True)
    if "airtrace" in feats and "torch" in feats:
        a, b = feats["airtrace"], feats["torch"]
        err = float((a - b).abs().max() / a.abs().max())
        rows.append({"section": "crosscheck", "method": "torch", "n": len(ids) - nq,
                     "note": f"same P matrices: max |airtrace - torch| / max |airtrace| = {err:.2e}"})
        print(f"  airtrace vs plain torch features (same P): max rel diff {err:.2e}")


def ekfac_section(n: int, methods: list[str], tmp: Path, rows: list[dict]) -> None:
    from peers.lm import per_query_spearman

    print(f"# ekfac: LoGra/EK-FAC influence of the 6 demo queries on n={n} training pairs", flush=True)
    scores = {}
    notes = {"airtrace": "featurize + fit (K-FAC pass + eigenvalue correction on the store) + score; "
                         "projected 16x16 space",
             "kronfluence": "fit_all_factors (covariance, eigendecomposition, lambda) + compute_pairwise_scores; "
                            "full layer space, empirical Fisher, damping 0.1 x mean eigenvalue"}
    for method in methods:
        path = tmp / f"ekfac-{method}.pt"
        r = run_child("ekfac", method=method, n=n, path=str(path))
        scores[method] = torch.load(path)
        rows.append({"section": "ekfac", "method": method, "n": r["examples"], "seconds": r["seconds"],
                     "examples_per_s": r["examples"] / r["seconds"], "peak_extra_mib": r["extra_bytes"] / C.MIB,
                     "note": notes[method]})
        print(f"  ekfac {method:12s} n={r['examples']:4d} {r['seconds']:8.1f} s  peak +{r['extra_bytes'] / C.MIB:.0f} MiB"
              f"  (load {_load()})", flush=True)
    if len(scores) == 2:
        ref = next(r for r in rows if r["section"] == "ekfac" and r["method"] == "airtrace")
        for r in rows:
            if r["section"] == "ekfac":
                r["ratio_vs_airtrace"] = r["seconds"] / ref["seconds"]
        rho = per_query_spearman(scores["airtrace"], scores["kronfluence"])
        rows.append({"section": "crosscheck", "method": "kronfluence", "n": n, "spearman": float(rho.mean()),
                     "note": "EK-FAC influence, airtrace (projected) vs kronfluence (full space); per query: "
                             + " ".join(f"{v:.2f}" for v in rho.tolist())})
        print(f"  airtrace EK-FAC vs kronfluence EK-FAC: per-query Spearman mean {rho.mean():.3f} "
              f"({' '.join(f'{v:.2f}' for v in rho.tolist())})")


def make_store(path: Path, n: int, seed: int = 0) -> None:
    from airtrace.store import StoreWriter

    gen = torch.Generator().manual_seed(seed)
    with StoreWriter(path, "synthetic", SCORE_K, "bfloat16", ROWS_PER_SHARD, {"synthetic": True}) as w:
        for start in range(0, n, ROWS_PER_SHARD):
            rows = min(ROWS_PER_SHARD, n - start)
            w.append(torch.randn(rows, SCORE_K, generator=gen), list(range(start, start + rows)))
        w.close()


def score_section(sizes: list[int], tmp: Path, rows: list[dict]) -> None:
    print(f"# score: q={SCORE_Q} queries x n in {sizes} rows, k={SCORE_K}, bfloat16 shards of {ROWS_PER_SHARD} rows, "
          f"top-{TOPK}", flush=True)
    for n in sizes:
        path = tmp / f"store-{n}"
        start = time.perf_counter()
        make_store(path, n)
        print(f"  wrote synthetic store n={n} in {time.perf_counter() - start:.1f} s", flush=True)
        results = {}
        for method in ("airtrace", "torch"):
            r = run_child("score", method=method, store_path=str(path), seed=1)
            results[method] = torch.load(str(path) + f".{method}.pt")
            rows.append({"section": "score", "method": method, "n": n, "seconds": r["seconds"],
                         "rows_per_s": n / r["seconds"], "peak_extra_mib": r["extra_bytes"] / C.MIB,
                         "note": "stream_scores over the store (sha256-verified shards, prefetch)" if method == "airtrace"
                         else "plain torch: safetensors load_file per shard, float(), Q@X.T, topk, merge"})
            print(f"  score {method:9s} n={n:8d} {r['seconds']:7.2f} s  {n / r['seconds']:10.0f} rows/s  "
                  f"peak +{r['extra_bytes'] / C.MIB:.0f} MiB  (load {_load()})", flush=True)
        same = bool(torch.equal(results["airtrace"]["indices"], results["torch"]["indices"]))
        diff = float((results["airtrace"]["values"] - results["torch"]["values"]).abs().max())
        rows.append({"section": "crosscheck", "method": "torch", "n": n,
                     "note": f"score top-{TOPK}: same indices {same}, max |value diff| {diff:.2e}"})
        print(f"  airtrace vs torch top-{TOPK}: same indices {same}, max value diff {diff:.2e}")
        ours, plain = rows[-3], rows[-2]
        ours["ratio_vs_airtrace"], plain["ratio_vs_airtrace"] = 1.0, plain["seconds"] / ours["seconds"]
        shutil.rmtree(path)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- targets


def targets(rows: list[dict], quick: bool) -> list[str]:
    lines = []
    for section in ("featurize", "featurize-fixed-shape"):
        feat = [r for r in rows if r["section"] == section]
        if not feat:
            continue
        big = max(r["n"] for r in feat)
        at = {r["method"]: r for r in feat if r["n"] == big}
        peers = [m for m in at if m not in ("airtrace", "torch")]
        if "airtrace" in at:
            for m in [m for m in at if m != "airtrace"]:
                ratio = at["airtrace"]["examples_per_s"] / at[m]["examples_per_s"]
                lines.append(f"      {section} airtrace / {m}: {ratio:.2f}x examples/s (n={big})")
            best = max(peers, key=lambda m: at[m]["examples_per_s"]) if peers else None
            ratio = at["airtrace"]["examples_per_s"] / at[best]["examples_per_s"] if best else None
            lines.append(C.target(f"{section} throughput / the best peer's ({best or 'no peer ran'})", ratio,
                                  FEATURIZE_VS_BEST_PEER))
            if ratio is not None:
                lines.append(f"      {section} throughput / the best peer's: {ratio / FEATURIZE_STRETCH:.2f} of the "
                             f"{FEATURIZE_STRETCH:g}x stretch figure (reported, not a target)")
        sizes = sorted({r["n"] for r in feat})
        for m in sorted({r["method"] for r in feat}):
            peaks = [next(r for r in feat if r["method"] == m and r["n"] == s)["peak_extra_mib"] for s in sizes]
            lo, hi = peaks[0], max(peaks[1:])
            lines.append(C.target(f"{section}[{m}] peak memory growth (MiB) for n={sizes[0]} -> "
                                  f"{','.join(map(str, sizes[1:]))}", hi - lo,
                                  max(MEMORY_FLAT_SHARE * lo, MEMORY_FLAT_MIB), higher_is_better=False,
                                  detail=f" ({' -> '.join(f'{p:.0f}' for p in peaks)} MiB)"))
    ek = {r["method"]: r for r in rows if r["section"] == "ekfac"}
    if "airtrace" in ek:
        ratio = ek["kronfluence"]["seconds"] / ek["airtrace"]["seconds"] if "kronfluence" in ek else None
        lines.append(C.target("EK-FAC pipeline t_kronfluence / t_airtrace", ratio, EKFAC_VS_KRONFLUENCE,
                              detail=" (featurize+fit+score vs fit_all_factors+compute_pairwise_scores)"))
    sc = [r for r in rows if r["section"] == "score"]
    if sc:
        big = max(r["n"] for r in sc)
        by = {r["method"]: r for r in sc if r["n"] == big}
        ratio = by["torch"]["seconds"] / by["airtrace"]["seconds"]
        lines.append(f"      score airtrace / plain torch: {ratio:.2f}x rows/s (n={big}); no peer exposes a "
                     "streamed store scorer comparable here (see README)")
        sizes = sorted({r["n"] for r in sc})
        for m in ("airtrace", "torch"):
            lo, hi = (next(r for r in sc if r["method"] == m and r["n"] == s)["peak_extra_mib"] for s in
                      (sizes[0], sizes[-1]))
            lines.append(C.target(f"score[{m}] peak memory (MiB) at every n", max(lo, hi), SHARD_BOUND * SHARD_MIB,
                                  higher_is_better=False, detail=f" ({SHARD_BOUND} shards; {lo:.0f} -> {hi:.0f} MiB "
                                                                 f"for n={sizes[0]} -> {sizes[-1]})"))
    if quick:
        lines.append("n/a   (--quick: tiny sizes, figures are a smoke test, not results)")
    return lines


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke pass: tiny sizes, writes nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for bench_pipeline.csv (default benches/results/<device-slug>/; "
                             "--quick writes nothing unless --out is given)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections from {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated increasing training-set sizes for featurize, two or more "
                             "(default 32,96; --quick 4,10); EK-FAC uses the first")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated featurize methods from {','.join(FEATURIZERS)} (default: airtrace, "
                             "torch and every peer that imports)")
    parser.add_argument("--pad-to-max", action="store_true",
                        help="featurize only: pad every batch to 64 tokens (same batch shape at both sizes, for the "
                             "memory check); rows go to section featurize-fixed-shape and the CSV to "
                             "bench_pipeline_fixed_shape.csv")
    parser.add_argument("--repeats", type=int, default=None,
                        help="featurize runs per method at the largest size, fastest kept (default 2; --quick 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS / torch threads of every measurement (default: torch's default); "
                             "on a loaded machine 1 avoids OpenMP barrier stalls")
    C.add_check_flag(parser)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad or not args.only:
        parser.error(f"--only: unknown section(s) {bad or args.only!r}; choose from {', '.join(SECTIONS)}")
    try:
        sizes = [int(s) for s in (args.sizes or ("4,10" if args.quick else "32,96")).split(",")]
    except ValueError:
        parser.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    if len(sizes) < 2 or sizes[0] <= 0 or any(a >= b for a, b in zip(sizes, sizes[1:])):
        parser.error(f"--sizes: need two or more increasing positive sizes, got {sizes}")
    args.sizes = sizes
    if args.methods is not None:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in args.methods if m not in FEATURIZERS]
        if bad or not args.methods:
            parser.error(f"--methods: unknown method(s) {bad or args.methods!r}; choose from {', '.join(FEATURIZERS)}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: {args.out} exists and is not a folder")
    if args.pad_to_max and args.only != ["featurize"]:
        parser.error("--pad-to-max measures featurize only: add --only featurize")
    if args.pad_to_max:
        from peers.lm import BATCH_SIZE

        if any(n % BATCH_SIZE for n in sizes):
            parser.error(f"--pad-to-max: every size must be a multiple of the batch size {BATCH_SIZE} (full batches, "
                         f"one batch shape), got {sizes}")
    return args


def csv_name(only: list[str], pad_to_max: bool) -> str:
    """The results file: bench_pipeline.csv for every section, else one named after the sections run (a partial run
    does not replace the other sections' rows)."""
    if pad_to_max:
        return "bench_pipeline_fixed_shape.csv"
    return "bench_pipeline.csv" if set(only) == set(SECTIONS) else f"bench_pipeline_{'_'.join(only)}.csv"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:  # inherited by every child process
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    head = C.header(gpu=False)
    C.print_header(head, "airtrace bench_pipeline" + (" --quick" if args.quick else ""))
    rows: list[dict] = []
    peers = available_peers(rows)
    print("# peers   " + ", ".join(f"{p} {v or 'SKIPPED'}" for p, v in peers.items()))
    print("# traker/dattri: no featurize row (see benches/README.md, bench_pipeline: what each number means)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline-"))
    try:
        if "featurize" in args.only:
            methods = [m for m in FEATURIZERS if (m in ("airtrace", "torch") or peers.get(m))
                       and (args.methods is None or m in args.methods)]
            featurize_section(args.sizes, methods, args.repeats, tmp, rows, args.pad_to_max)
        if "ekfac" in args.only:
            ekfac_section(args.sizes[0], ["airtrace"] + (["kronfluence"] if peers.get("kronfluence") else []),
                          tmp, rows)
        if "score" in args.only:
            score_section([2 * 10**4, 10**5] if args.quick else [2 * 10**5, 10**6], tmp, rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for section in ("peers", "featurize", "featurize-fixed-shape", "ekfac", "score", "crosscheck"):
        sel = [r for r in rows if r["section"] == section]
        if sel:
            C.print_table(sel, COLUMNS[1:] if section != "crosscheck" else ("method", "n", "spearman", "note"),
                          title=section)
    status = C.report_targets(targets(rows, args.quick), args.check, title=f"targets (load average now {_load()})")
    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        name = csv_name(args.only, args.pad_to_max)
        path = C.write_csv(out / name, rows, COLUMNS, head)
        print(f"\n# wrote {path}")
    return status


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
