"""``airtrace selfcheck``: every op on every backend here against the float64 reference under the error bound, timed;
imports ``airtrace.ops.selfcheck``, ``airtrace.env`` and ``airtrace.cli.args``."""

from __future__ import annotations

import argparse
import sys

from airtrace.cli.args import positive_int


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from airtrace.ops import selfcheck
    from airtrace.env import report

    print(report())
    print()
    rows = selfcheck.run(scale=args.scale, repeats=args.repeats, quick=args.quick,
                         progress=lambda m: print(m, file=sys.stderr))
    print(selfcheck.format_rows(rows))
    ok = selfcheck.all_passed(rows)
    verdict = ("every backend is within the fp32-accumulation bound of the float64 reference" if ok
               else "MISMATCH: a backend exceeds the fp32-accumulation bound of the float64 reference (err/bound > 1)")
    print(f"\nself-check: {verdict}")
    return 0 if ok else 1


def add_parser(sub) -> None:
    """Register ``airtrace selfcheck``."""
    check = sub.add_parser(
        "selfcheck",
        help="check every op on every backend here against the float64 reference (error bound) and time it")
    check.add_argument("--scale", type=positive_int, default=1, help="problem size multiplier (default 1)")
    check.add_argument("--repeats", type=positive_int, default=3, help="timing repeats per backend (default 3)")
    check.add_argument("--quick", action="store_true",
                       help="small shapes for every backend (seconds; the Triton interpreter gets them anyway)")
    check.set_defaults(run=_cmd_selfcheck, parser=check)
