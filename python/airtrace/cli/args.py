"""Argument types and the usage error shared by every command (``airtrace`` and its ``eval`` / ``airrep`` commands);
imports only ``airtrace.util``."""

from __future__ import annotations

import argparse
import json

from airtrace.util.checks import check_groups


class UsageError(Exception):
    """A bad command line discovered after parsing (e.g. an unusable ``--model``)."""


def bounded(parse, lowest, description: str, highest=float("inf")):
    """An argparse type: ``parse(text)`` with ``lowest < value < highest`` (finite), else a usage error."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not lowest < value < highest:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text}")
        return value

    return convert


positive_int = bounded(int, 0, "a positive integer")
non_negative_int = bounded(int, -1, "a non-negative integer")
positive_float = bounded(float, 0.0, "a finite positive number")
fraction = bounded(float, 0.0, "a number in (0, 1)", 1.0)


def read_groups(path: str | None) -> list | None:
    """The ``--groups`` JSON file: a list of lists of integer train row indices (None without the flag).

    Raises:
        UsageError: naming ``--groups PATH``: unreadable, not JSON, or an entry that is not an integer row index.
    """
    if path is None:
        return None
    try:
        with open(path) as f:
            return check_groups(json.load(f))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--groups {path}: {exc}") from None
