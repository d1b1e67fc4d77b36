"""The ``airtrace`` command line: ``airtrace env``, ``airtrace demo``."""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _cmd_env(args: argparse.Namespace) -> int:
    from airtrace.env import report

    print(report())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from airtrace import selfcheck
    from airtrace.env import report

    print(report())
    print()
    rows = selfcheck.run(scale=args.scale, repeats=args.repeats, progress=lambda m: print(m, file=sys.stderr))
    print(selfcheck.format_rows(rows))
    ok = selfcheck.all_passed(rows)
    print(f"\nself-check: {'all backends match the float64 reference' if ok else 'MISMATCH against the float64 reference'}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airtrace", description="Training-data attribution engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    env = sub.add_parser("env", help="show which kernel backends are available and why not")
    env.set_defaults(run=_cmd_env)

    demo = sub.add_parser("demo", help="check every kernel backend against the float64 reference and time it")
    demo.add_argument("--scale", type=_positive_int, default=1, help="problem size multiplier (default 1)")
    demo.add_argument("--repeats", type=_positive_int, default=3, help="timing repeats per backend (default 3)")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
