"""The command line's check, before torch is imported, that an address-space limit (``ulimit -v``) leaves room to load
torch and start the kernels' threads; imports nothing from airtrace (nor torch).

Loading torch under too low a limit does not raise: it aborts inside torch's own
libraries (``std::bad_alloc``, OpenBLAS or thread-local storage failures). So when
the ``airtrace`` command runs under a finite ``RLIMIT_AS``, a child process with the
same limit loads torch and runs a kernel on all threads first; if the child fails,
the command stops with a one-line memory error. Without a limit nothing is done.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

PROBE = ("import torch; from airtrace.ops.digest import digest; "
         "digest(torch.zeros(1, 1 << 20, dtype=torch.uint8), backend='cpu')")


def running_the_cli() -> bool:
    """This process is the ``airtrace`` command: its console script, or ``python -m airtrace`` (also under torchrun)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if os.path.basename(sys.argv[0]) == "airtrace":
        return True
    return any(flag == "-m" and module == "airtrace" for flag, module in zip(argv, argv[1:]))


def check_cli_memory() -> None:
    """Exit with a one-line memory error when the ``airtrace`` command's address-space limit is too low to load torch."""
    if not running_the_cli():
        return
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit == resource.RLIM_INFINITY:
        return
    try:
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, timeout=600)
        failed = probe.returncode != 0
    except (OSError, subprocess.SubprocessError):
        failed = True
    if failed:
        print(f"airtrace: error: out of memory: the address space is limited to {limit >> 20} MiB (ulimit -v), too "
              "little to load torch and run the kernels. Fix: raise the limit (ulimit -v) or remove it.",
              file=sys.stderr)
        sys.exit(1)
