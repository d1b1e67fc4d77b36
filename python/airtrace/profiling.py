"""Named profiler ranges per pipeline stage, Chrome traces, and per-stage time breakdowns; imports nothing from
airtrace.

The pipeline marks its stages with :func:`stage` (a ``torch.profiler.record_function``
range named ``airtrace.<stage>``; nearly free when no profiler runs):

- ``capture``: one forward + backward of a batch under the gradient hooks
  (contains ``project``, which runs inside the backward hooks);
- ``project``: per-layer projection of (A, G) (``project_factored`` / ``project_dense``);
- ``store_write``: appending a batch's features to the store writer (cast, copy,
  and the shard write + fsync whenever a shard fills);
- ``fit_update``: feeding a batch of tokens / features to a curvature fitter;
- ``precondition``: applying H⁻¹ to query (or self-influence) features;
- ``store_read``: waiting for the next shard from the store's prefetch thread;
- ``score``: one shard's top-k, group sums and full-matrix block.

:func:`profile` wraps a block in ``torch.profiler.profile`` and writes a Chrome
trace (open it in ``chrome://tracing`` or https://ui.perfetto.dev);
:func:`stage_times` reads one back and sums each stage's ranges.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, record_function

PREFIX = "airtrace."
STAGES = ("capture", "project", "store_write", "fit_update", "precondition", "store_read", "score")


def stage(name: str) -> record_function:
    """A profiler range ``airtrace.<name>`` for one of :data:`STAGES`.

    Raises:
        ValueError: ``name`` is not a known stage.
    """
    if name not in STAGES:
        raise ValueError(f"unknown profiling stage {name!r}; stages are {STAGES}")
    return record_function(PREFIX + name)


def timed_iter(iterable, name: str = "store_read") -> Iterator:
    """Yield from ``iterable``, timing each ``next()`` as the stage ``name`` (e.g. waiting for a shard).

    Closing this generator early closes ``iterable``'s iterator too (e.g. stops a prefetch thread).
    """
    iterator = iter(iterable)
    try:
        while True:
            with stage(name):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
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
