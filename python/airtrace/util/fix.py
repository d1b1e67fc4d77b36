"""The "Fix:" hint of an error in the caller's terms: Python arguments in the library, command-line flags in the CLI;
imports nothing from airtrace.

An error's message ends with ``Fix: <what to do in Python>``; when the command line
words it differently the error carries ``cli_fix``, which :func:`cli_message` puts
in its place.
"""

from __future__ import annotations

FIX = "Fix: "


def with_fix(error: BaseException, cli_fix: str | None) -> BaseException:
    """``error`` (whose message ends with its Python ``Fix: ...``) with the command line's wording of the fix."""
    error.cli_fix = cli_fix
    return error


def cli_message(error: BaseException) -> str:
    """The message of ``error`` with its fix as the command line words it (the message itself when it has none)."""
    text = str(error)
    cli_fix = getattr(error, "cli_fix", None)
    head, found, _ = text.rpartition(FIX)
    return f"{head}{FIX}{cli_fix}" if cli_fix and found else text
