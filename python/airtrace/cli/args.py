"""Argument types, output-file checks and the usage error shared by every command (``airtrace`` and its ``eval`` /
``airrep`` commands); imports only ``airtrace.util``."""

from __future__ import annotations

import argparse
import json
import os

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


def key_value(text: str) -> tuple[str, object]:
    """An argparse type for ``KEY=VALUE``: the value parsed as JSON when it is JSON (numbers, true, lists), else
    kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a Python name, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def check_output(path: str | None, flag: str) -> None:
    """Fail before any work when ``path`` cannot be written: its folder is missing or read-only, or it is a folder.

    Raises:
        UsageError: naming ``flag`` and the fix.
    """
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; name a file in it")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable")


def world_readable(path: str | None) -> None:
    """Mode 0644 for a file a command wrote (whatever the umask), so others can read its results."""
    if path is not None and os.path.isfile(path):
        os.chmod(path, 0o644)
