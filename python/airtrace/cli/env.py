"""``airtrace env``: which kernel backends are available, and why not; imports ``airtrace.env``."""

from __future__ import annotations

import argparse


def _cmd_env(args: argparse.Namespace) -> int:
    from airtrace.env import report

    print(report())
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace env``."""
    env = sub.add_parser("env", help="show which kernel backends are available and why not")
    env.set_defaults(run=_cmd_env, parser=env)
