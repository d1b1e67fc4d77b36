"""Named profiler ranges per pipeline stage, Chrome traces, and per-stage summaries (seconds, share, rows/s, MB/s,
peak memory); imports nothing from airtrace.

The pipeline marks its stages with :func:`stage` (a ``torch.profiler.record_function``
range named ``airtrace.<stage>``, counting the rows and bytes it handles; nearly free
when no profiler or :func:`collect` runs):

- ``capture``: one forward + backward of a batch under the gradient hooks
  (contains ``project``, which runs inside the backward hooks);
- ``project``: per-layer projection of (A, G) (``project_factored`` / ``project_dense``);
- ``store_write``: appending a batch's features to the store writer (cast, copy,
  and the shard write + fsync whenever a shard fills);
- ``fit_update``: feeding a batch of tokens / features to a curvature fitter;
- ``precondition``: applying H⁻¹ to query (or self-influence) features;
- ``store_read``: waiting for the next shard from the store's prefetch thread;
- ``score``: one shard's top-k, group sums and full-matrix block.

:func:`collect` times every stage of a block without the profiler (wall seconds,
exclusive of nested stages, rows and bytes, the process's resident memory at each
stage's end) into a :class:`Summary`; :func:`format_summary` prints it as a table.
:func:`profile` wraps a block in ``torch.profiler.profile`` and writes a Chrome
trace (open it in ``chrome://tracing`` or https://ui.perfetto.dev);
:func:`attach_summary` adds a summary to a trace file (key ``airtraceSummary``) and
:func:`trace_summary` reads one back (from the events when there is none);
:func:`stage_times` sums each stage's ranges of a trace.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch.profiler import ProfilerActivity, record_function

PREFIX = "airtrace."
STAGES = ("capture", "project", "store_write", "fit_update", "precondition", "store_read", "score")


@dataclass
class StageStats:
    """What one stage did during a :func:`collect` block.

    Attributes:
        name: stage name.
        calls: ranges entered.
        seconds: wall time inside its ranges (inclusive of nested stages).
        exclusive: ``seconds`` minus the time of other stages nested inside (capture without project).
        rows: examples (or train rows) it handled.
        nbytes: feature bytes it read or wrote.
        peak_rss: largest resident memory of the process (bytes) seen at the end of one of its ranges.
    """

    name: str
    calls: int = 0
    seconds: float = 0.0
    exclusive: float = 0.0
    rows: int = 0
    nbytes: int = 0
    peak_rss: int = 0


@dataclass
class Summary:
    """Per-stage statistics of a block (:func:`collect`), stages in :data:`STAGES` order.

    Attributes:
        stages: {stage: StageStats}.
        wall: seconds the block took.
        peak_rss: the process's peak resident memory (bytes) at the block's end.
        peak_cuda: peak CUDA memory allocated by torch (bytes) during the block, or None.
    """

    stages: dict[str, StageStats] = field(default_factory=dict)
    wall: float = 0.0
    peak_rss: int = 0
    peak_cuda: int | None = None

    def to_dict(self) -> dict:
        return {"stages": [asdict(s) for s in self.stages.values()], "wall": self.wall, "peak_rss": self.peak_rss,
                "peak_cuda": self.peak_cuda}

    @classmethod
    def from_dict(cls, data: dict) -> Summary:
        stages = {s["name"]: StageStats(**s) for s in data["stages"]}
        return cls(stages, data["wall"], data["peak_rss"], data.get("peak_cuda"))


_collecting: Summary | None = None
_open = threading.local()  # per thread: the stack of open Stage ranges


def _rss() -> int:
    """Resident memory of this process in bytes (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stage:
    """One range of a stage: a ``record_function`` range, timed and counted under :func:`collect`.

    ``add(rows, nbytes)`` counts what the range handled when it is known only inside it.
    """

    __slots__ = ("name", "rows", "nbytes", "_range", "_start", "_nested")

    def __init__(self, name: str, rows: int = 0, nbytes: int = 0):
        if name not in STAGES:
            raise ValueError(f"unknown profiling stage {name!r}; stages are {STAGES}")
        self.name, self.rows, self.nbytes = name, rows, nbytes

    def add(self, rows: int = 0, nbytes: int = 0) -> None:
        self.rows += rows
        self.nbytes += nbytes

    def __enter__(self) -> Stage:
        self._range = record_function(PREFIX + self.name)
        self._range.__enter__()
        if _collecting is not None:
            self._start, self._nested = time.perf_counter(), 0.0
            stack = getattr(_open, "stack", None)
            if stack is None:
                stack = _open.stack = []
            stack.append(self)
        return self

    def __exit__(self, *exc) -> None:
        summary = _collecting
        stack = getattr(_open, "stack", None)
        if summary is not None and stack and stack[-1] is self:
            stack.pop()
            seconds = time.perf_counter() - self._start
            if stack:
                stack[-1]._nested += seconds
            stats = summary.stages.setdefault(self.name, StageStats(self.name))
            stats.calls += 1
            stats.seconds += seconds
            stats.exclusive += seconds - self._nested
            stats.rows += self.rows
            stats.nbytes += self.nbytes
            stats.peak_rss = max(stats.peak_rss, _rss())
        self._range.__exit__(*exc)


def stage(name: str, rows: int = 0, nbytes: int = 0) -> Stage:
    """A profiler range ``airtrace.<name>`` for one of :data:`STAGES`, handling ``rows`` examples and ``nbytes``.

    Raises:
        ValueError: ``name`` is not a known stage.
    """
    return Stage(name, rows, nbytes)


@contextlib.contextmanager
def collect(enabled: bool = True) -> Iterator[Summary]:
    """Time and count every stage of the block into the yielded :class:`Summary` (filled when the block ends;
    stays empty when not ``enabled``). Blocks do not nest."""
    global _collecting
    summary = Summary()
    if not enabled:
        yield summary
        return
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start, _collecting = time.perf_counter(), summary
    try:
        yield summary
    finally:
        _collecting = None
        summary.wall = time.perf_counter() - start
        summary.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        summary.peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        order = [s for s in STAGES if s in summary.stages]
        summary.stages = {s: summary.stages[s] for s in order}


def format_summary(summary: Summary) -> str:
    """The per-stage table of a :class:`Summary`: calls, exclusive seconds, share of the wall time, rows/s and
    MB/s (over the stage's inclusive time), and the largest resident memory seen at a stage's end."""
    def rate(amount: float, seconds: float, scale: float = 1.0) -> str:
        return f"{amount / scale / seconds:.4g}" if amount and seconds > 0 else "-"

    lines = [f"{'stage':14s} {'calls':>7s} {'seconds':>9s} {'share':>7s} {'rows/s':>10s} {'MB/s':>9s} {'peak MB':>8s}"]
    wall = summary.wall
    for s in summary.stages.values():
        share = 100.0 * s.exclusive / wall if wall > 0 else 0.0
        lines.append(f"{s.name:14s} {s.calls:7d} {s.exclusive:9.3f} {share:6.1f}% {rate(s.rows, s.seconds):>10s} "
                     f"{rate(s.nbytes, s.seconds, 1e6):>9s} {s.peak_rss / 1e6 if s.peak_rss else 0:8.0f}")
    other = wall - sum(s.exclusive for s in summary.stages.values())
    if wall > 0:
        lines.append(f"{'(outside)':14s} {'':7s} {max(other, 0.0):9.3f} {100.0 * max(other, 0.0) / wall:6.1f}%")
    peaks = f"peak resident memory {summary.peak_rss / 1e6:.0f} MB"
    if summary.peak_cuda is not None:
        peaks += f", peak CUDA memory {summary.peak_cuda / 1e6:.0f} MB"
    lines.append(f"{'wall':14s} {'':7s} {wall:9.3f} {'100.0%':>7s}   {peaks}")
    return "\n".join(lines)


def timed_iter(iterable, name: str = "store_read") -> Iterator:
    """Yield from ``iterable``, timing each ``next()`` as the stage ``name`` (e.g. waiting for a shard); an item
    with ``features`` (a shard chunk) counts its rows and bytes.

    Closing this generator early closes ``iterable``'s iterator too (e.g. stops a prefetch thread).
    """
    iterator = iter(iterable)
    try:
        while True:
            with stage(name) as timed:
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                features = getattr(item, "features", None)
                if isinstance(features, torch.Tensor):
                    timed.add(features.shape[0], features.nbytes)
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def profile(path: str | os.PathLike | None) -> Iterator[torch.profiler.profile | None]:
    """Profile the block and write a Chrome trace JSON to ``path`` (no-op when ``path`` is None).

    CPU activity always, CUDA too when a GPU is available. The trace is written
    when the block ends, also when it raises. A path ending in ``.gz`` is gzipped.

    Raises:
        ValueError: the folder of ``path`` does not exist (checked before profiling starts).
    """
    if path is None:
        yield None
        return
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--profile {path}: the folder {folder} does not exist")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = torch.profiler.profile(activities=activities)
    prof.start()
    try:
        yield prof
    finally:
        prof.stop()
        prof.export_chrome_trace(path)


@dataclass(frozen=True)
class StageTime:
    """Time spent in one stage over a trace.

    Attributes:
        name: stage name (without the ``airtrace.`` prefix).
        calls: number of ranges.
        total_ms: summed duration of its ranges (inclusive of nested stages).
        exclusive_ms: ``total_ms`` minus the time of other airtrace stages nested inside
            (e.g. capture without project).
    """

    name: str
    calls: int
    total_ms: float
    exclusive_ms: float


def attach_summary(path: str | os.PathLike, summary: Summary) -> None:
    """Add ``summary`` to the Chrome trace at ``path`` (top-level key ``airtraceSummary``; viewers ignore it)."""
    path = os.fspath(path)
    trace = load_trace(path)
    trace["airtraceSummary"] = summary.to_dict()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt") as f:
        json.dump(trace, f)


def trace_summary(trace: dict | str | os.PathLike) -> tuple[Summary, bool]:
    """The :class:`Summary` of a trace: the one :func:`attach_summary` stored, else one built from its airtrace
    ranges (calls, seconds; no rows, bytes or memory; the wall time spans the first to the last range).

    Returns:
        (summary, whether it is the stored one).
    """
    trace = trace if isinstance(trace, dict) else load_trace(trace)
    stored = trace.get("airtraceSummary")
    if isinstance(stored, dict):
        try:
            return Summary.from_dict(stored), True
        except (KeyError, TypeError):
            pass
    ranges = stage_ranges(trace)
    wall = (max(s + d for _, _, s, d in ranges) - min(s for _, _, s, _ in ranges)) / 1e6 if ranges else 0.0
    stages = {t.name: StageStats(t.name, t.calls, t.total_ms / 1e3, t.exclusive_ms / 1e3)
              for t in stage_times(trace).values()}
    return Summary(stages, wall), False


def load_trace(path: str | os.PathLike) -> dict:
    """A Chrome trace JSON (optionally ``.gz``) as a dict.

    Raises:
        ValueError: the file is not a Chrome trace (names the file).
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            trace = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable Chrome trace JSON ({exc})") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise ValueError(f"{path}: not a Chrome trace (no traceEvents list)")
    return trace


def stage_ranges(trace: dict) -> list[tuple[str, int, float, float]]:
    """Airtrace ranges of a trace: ``(stage, thread id, start µs, duration µs)``, by start time."""
    out = []
    for event in trace["traceEvents"]:
        name = event.get("name")
        if event.get("ph") == "X" and isinstance(name, str) and name.startswith(PREFIX):
            out.append((name[len(PREFIX):], event.get("tid", 0), float(event["ts"]), float(event.get("dur", 0.0))))
    return sorted(out, key=lambda r: (r[2], -r[3]))


def stage_times(trace: dict | str | os.PathLike) -> dict[str, StageTime]:
    """Per-stage totals of a trace (a dict from :func:`load_trace`, or its path).

    Returns:
        {stage: StageTime}, stages in :data:`STAGES` order (only those present).
    """
    trace = trace if isinstance(trace, dict) else load_trace(trace)
    ranges = stage_ranges(trace)
    calls: dict[str, int] = {}
    total: dict[str, float] = {}
    nested: dict[str, float] = {}
    open_ranges: dict[object, list[tuple[str, float]]] = {}  # per thread: (stage, end) of enclosing ranges
    for name, tid, start, dur in ranges:
        stack = open_ranges.setdefault(tid, [])
        while stack and stack[-1][1] <= start:
            stack.pop()
        if stack:
            parent = stack[-1][0]
            nested[parent] = nested.get(parent, 0.0) + dur
        stack.append((name, start + dur))
        calls[name] = calls.get(name, 0) + 1
        total[name] = total.get(name, 0.0) + dur
    order = [s for s in STAGES if s in calls] + sorted(set(calls) - set(STAGES))
    return {s: StageTime(s, calls[s], total[s] / 1e3, (total[s] - nested.get(s, 0.0)) / 1e3) for s in order}


def format_stage_times(times: dict[str, StageTime], wall_ms: float | None = None) -> str:
    """A plain-text table of :func:`stage_times` (exclusive time, share of the sum or of ``wall_ms``)."""
    whole = wall_ms if wall_ms is not None else sum(t.exclusive_ms for t in times.values())
    lines = [f"{'stage':14s} {'calls':>7s} {'exclusive ms':>13s} {'total ms':>11s} {'share':>7s}"]
    for t in times.values():
        share = 100.0 * t.exclusive_ms / whole if whole else 0.0
        lines.append(f"{t.name:14s} {t.calls:7d} {t.exclusive_ms:13.1f} {t.total_ms:11.1f} {share:6.1f}%")
    return "\n".join(lines)
