"""``airtrace profile``: the per-stage summary of a Chrome trace written by ``--profile TRACE.json``; imports
``airtrace.profiling``."""

from __future__ import annotations

import argparse


def _cmd_profile(args: argparse.Namespace) -> int:
    from airtrace import profiling

    trace = profiling.load_trace(args.trace)
    summary, stored = profiling.trace_summary(trace)
    events = trace["traceEvents"]
    ours = len(profiling.stage_ranges(trace))
    print(f"{args.trace}: {len(events)} events, {ours} of them airtrace stage ranges")
    if not stored:
        print("(no airtrace summary in the trace: seconds from its ranges; rows, bytes and memory unknown)")
    print(profiling.format_summary(summary))
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace profile``."""
    p = sub.add_parser("profile", help="summarise a trace written by --profile TRACE.json: seconds, share, rows/s, "
                                       "MB/s and peak memory per stage")
    p.add_argument("trace", metavar="TRACE.json", help="Chrome trace (optionally .gz) written by --profile")
    p.set_defaults(run=_cmd_profile, parser=p)
