"""``airtrace selfcheck``: every kernel backend against the float64 reference, timed; imports
``airtrace.ops.selfcheck``, ``airtrace.env`` and ``airtrace.cli.args``."""

from __future__ import annotations

import argparse
import sys

from airtrace.cli.args import positive_int


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from airtrace.ops import selfcheck
    from airtrace.env import report

    print(report())
    print()
    rows = selfcheck.run(scale=args.scale, repeats=args.repeats, progress=lambda m: print(m, file=sys.stderr))
    print(selfcheck.format_rows(rows))
    ok = selfcheck.all_passed(rows)
    print(f"\nself-check: {'all backends match the float64 reference' if ok else 'MISMATCH against the float64 reference'}")
    return 0 if ok else 1


def add_parser(sub) -> None:
    """Register ``airtrace selfcheck``."""
    check = sub.add_parser("selfcheck", help="check every kernel backend against the float64 reference and time it")
    check.add_argument("--scale", type=positive_int, default=1, help="problem size multiplier (default 1)")
    check.add_argument("--repeats", type=positive_int, default=3, help="timing repeats per backend (default 3)")
    check.set_defaults(run=_cmd_selfcheck, parser=check)
