"""Shared helpers for the airtrace benchmarks (benches/bench_*.py).

- ``header()``: where the figures come from (device, cores, torch, airtrace, git sha, date).
- ``median_time(fn, repeats, warmup)``: median wall time in milliseconds.
- ``print_table`` / ``write_csv``: one row per measurement, header fields as leading CSV columns.
- ``peak_rss_subprocess`` (CPU, fresh interpreter, Linux /proc) and ``cuda_peak_extra`` (GPU,
  in process): peak memory a call adds on top of its inputs.
- ``target``, ``add_check_flag``, ``report_targets``: the PASS / MISS lines of a bench's stated
  targets, and ``--check``, which turns a MISS into exit status 1.
- ``PEERS``, ``peer_unavailable``, ``skipped``: which peer libraries import here, and the
  ``SKIPPED <peer>: <reason>`` row of one that does not.

Run as a script only by ``peak_rss_subprocess`` (``python _common.py --peak-child ...``).
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benches" / "results"
MIB = 2**20


# --------------------------------------------------------------------------- header

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def git_sha(repo: Path = REPO) -> str:
    """Short HEAD sha, '+dirty' when the tree has changes outside benches/results; 'unknown' without git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--short", "HEAD")
        status = git("status", "--porcelain", "--", ".", ":(exclude)benches/results")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0 or not head.stdout.strip():
        return "unknown"
    return head.stdout.strip() + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")


def header(gpu: bool | None = None) -> dict[str, str]:
    """Fields that identify a run; ``gpu`` defaults to torch.cuda.is_available()."""
    import airtrace

    gpu = torch.cuda.is_available() if gpu is None else gpu
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = str(torch.get_num_threads())
    if os.environ.get("OMP_NUM_THREADS"):
        threads += f" (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    return {
        "device": torch.cuda.get_device_name(0) if gpu else cpu_model(),
        "cpu": f"{cpu_model()}, {cpus} logical CPUs",
        "threads": threads,
        "torch": torch.__version__,
        "airtrace": f"{airtrace.__version__} ({Path(airtrace.__file__).parent})",
        "git_sha": git_sha(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_avg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def device_slug(head: dict[str, str]) -> str:
    """'AMD EPYC' + 2 CPUs -> 'cpu-amd-epyc-2cpu'; a GPU name -> 'gpu-nvidia-h100-80gb-hbm3'."""
    name = re.sub(r"[^a-z0-9]+", "-", head["device"].lower()).strip("-") or "unknown"
    if head["device"] == cpu_model():
        cpus = re.search(r"(\d+) logical CPUs", head["cpu"])
        return f"cpu-{name}-{cpus.group(1) if cpus else '?'}cpu"
    return f"gpu-{name}"


def results_dir(out: Path | None, quick: bool, head: dict[str, str]) -> Path | None:
    """Where a bench writes its CSV: ``--out`` if given, else nothing for ``--quick``, else
    benches/results/<device-slug>/."""
    if out is not None:
        return out
    return None if quick else RESULTS / device_slug(head)


def print_header(head: dict[str, str], title: str) -> None:
    print(f"# {title}")
    for key, value in head.items():
        print(f"# {key:9s} {value}")


# --------------------------------------------------------------------------- timing

def sync_for(device: str | torch.device) -> Callable[[], None]:
    """A function that waits for queued work on ``device`` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1,
                sync: Callable[[], None] = lambda: None, min_seconds: float = 0.0,
                max_repeats: int = 100) -> tuple[float, int]:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls.

    Times at least ``repeats`` calls, and keeps going (up to ``max_repeats``) until the timed
    calls add up to ``min_seconds``, so millisecond-scale ops get a robust median.
    ``sync`` runs before the clock starts and before it stops (pass ``sync_for(device)`` for GPU
    work). Returns (median_ms, number of timed calls).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats} warmup={warmup}")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds * 1e3 and len(times) < max_repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), len(times)


# --------------------------------------------------------------------------- output

def fmt(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> None:
    """Fixed-width table of ``rows``; columns empty in every row are left out."""
    cols = [c for c in columns if any(fmt(r.get(c)) for r in rows)]
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    if title:
        print(f"\n## {title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str], head: dict[str, str]) -> Path:
    """Write one line per row; the header fields come first as constant columns. Floats keep 6 digits."""
    clash = set(head) & set(columns)
    if clash:
        raise ValueError(f"row columns {sorted(clash)} clash with header fields; rename them")

    def cell(v):
        return "" if v is None else f"{v:.6g}" if isinstance(v, float) else v

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(head) + list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**head, **{c: cell(row.get(c)) for c in columns}})
    return path


# --------------------------------------------------------------------------- targets

def target(label: str, measured: float | None, goal: float, higher_is_better: bool = True, detail: str = "") -> str:
    """One target line: ``PASS`` / ``MISS`` when measured, ``n/a`` (never a miss) when it could not be."""
    if measured is None:
        return f"n/a   {label}: not measured{detail}"
    ok = measured >= goal if higher_is_better else measured <= goal
    return f"{'PASS' if ok else 'MISS'}  {label} {'>=' if higher_is_better else '<='} {goal:g}: {measured:.3g}{detail}"


def add_check_flag(parser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a stated target is missed (a MISS line under '## targets')")


def report_targets(lines: Sequence[str], check: bool, title: str = "targets") -> int:
    """Print the target lines; the exit status of the bench: 1 when ``check`` and a line is a MISS, else 0."""
    print(f"\n## {title}")
    for line in lines or ["n/a   no stated targets"]:
        print(line)
    missed = [line for line in lines if line.startswith("MISS")]
    if check:
        print(f"# --check: {len(missed)} of {sum(not line.startswith('n/a') for line in lines)} measured targets missed")
    return 1 if check and missed else 0


# --------------------------------------------------------------------------- development-suite benches

def add_suite_arguments(parser, quick_tasks: Sequence[str], subsets: int) -> None:
    """--quick, --tasks, --subsets and --out of a bench over the development suite's tasks."""
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(quick_tasks)}; writes nothing")
    parser.add_argument("--tasks", default=None, help="comma-separated suite tasks (default: the tabular ones)")
    parser.add_argument("--subsets", type=int, default=subsets, help=f"retrained subsets (default {subsets})")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benches/results/<device>)")


def suite_task_names(parser, args, quick_tasks: Sequence[str], tasks: Sequence[str]) -> list[str]:
    """The tasks a suite bench runs: --tasks, else the quick ones with --quick, else every task but "lm"."""
    names = args.tasks.split(",") if args.tasks else list(quick_tasks if args.quick else
                                                         [t for t in tasks if t != "lm"])
    unknown = [t for t in names if t not in tasks]
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; choose from {', '.join(tasks)}")
    return names


# --------------------------------------------------------------------------- peers

PEERS = {"kronfluence": "kronfluence", "traker": "trak", "dattri": "dattri", "logix": "logix", "bergson": "bergson",
         "captum": "captum"}
"""Peer library -> its import name."""


def peer_unavailable(peer: str) -> str | None:
    """Why ``peer`` (a key of PEERS) cannot run here, or None when it imports."""
    module = PEERS[peer]
    if importlib.util.find_spec(module) is None:
        return f"not installed (module {module!r} not found; benches/setup_peers.sh installs the peers)"
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means the peer cannot run
        return f"installed but its import fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return None


def skipped(peer: str, reason: str) -> str:
    """The row printed for a peer that is not run: ``SKIPPED <peer>: <reason>``."""
    line = f"SKIPPED {peer}: {reason}"
    print(line, flush=True)
    return line


# --------------------------------------------------------------------------- peak memory

def _status_bytes(field: str) -> int:
    """A 'kB' field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_subprocess(script: Path, func: str, kwargs: dict, timeout: float = 900) -> dict:
    """Peak resident memory that one call adds, measured in a fresh interpreter (Linux).

    The child imports ``script`` (not as __main__) and calls ``func(**kwargs)``, which builds
    its inputs and returns a zero-argument callable; the child then resets the peak-RSS mark,
    records the RSS, runs the callable once and reads the peak. Returns {"extra_bytes",
    "base_bytes", "peak_bytes", "masked"}; ``masked`` is True when the peak could not be reset
    and the process had already peaked higher before the call (the extra is then an upper bound).

    The peak is the child's VmHWM, not ``getrusage().ru_maxrss``: Linux carries ru_maxrss over
    from the parent across fork + exec, so a child of a large benchmark process would report the
    parent's peak.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak-child", str(script), func, json.dumps(kwargs)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"peak-memory child failed (exit {res.returncode}): {func}({kwargs})\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _peak_child(script: str, func: str, kwargs_json: str) -> None:
    spec = importlib.util.spec_from_file_location("_bench_peak_child", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    call = getattr(module, func)(**json.loads(kwargs_json))
    reset = _reset_peak()
    base, before = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    call()
    peak = _status_bytes("VmHWM")
    print(json.dumps({"extra_bytes": peak - base, "base_bytes": base, "peak_bytes": peak,
                      "masked": not reset and peak <= before and before > base}))


def cuda_peak_extra(call: Callable[[], object]) -> int:
    """Bytes the torch CUDA allocator held at peak during ``call()`` above what was allocated before.

    Memory a kernel allocates outside torch's allocator (raw cudaMalloc) is not seen.
    """
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peak-child":
        _peak_child(*sys.argv[2:])
    else:
        sys.exit("usage: _common.py --peak-child SCRIPT FUNC KWARGS_JSON (used by peak_rss_subprocess)")
