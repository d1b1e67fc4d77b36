"""The store's single-writer lock (``StoreLock``): an flock(2) on ``writer.lock`` holding the owner's pid and host;
imports ``airtrace.store.errors`` and ``.format``."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket

from airtrace.store.errors import StoreError, StoreLockedError
from airtrace.store.format import LOCK

log = logging.getLogger("airtrace")


class StoreLock:
    """Exclusive write lock of a store directory: ``<dir>/writer.lock`` holding the owner's pid and host.

    The lock is an flock(2) on the open file, so the kernel releases it when
    the owner dies, even by SIGKILL; the file is then stale (it names a dead
    owner) and the next :meth:`acquire` takes it over with a warning. Two
    lock objects conflict even within one process. :meth:`release` deletes
    the file, so a finished store holds no lock file.

    Example::

        with StoreLock(path):       # anything that writes files into the store directory
            ...

    Attributes:
        path: the lock file.
        recovered: the owner record of a stale lock taken over by :meth:`acquire`, else None.
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = os.path.join(os.fspath(directory), LOCK)
        self.recovered: dict | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> StoreLock:
        """Take the lock, or raise :class:`StoreLockedError` naming the file and the owner pid.

        Raises:
            StoreLockedError: a live writer holds it.
            StoreError: the lock file cannot be created (names the file).
        """
        if self._fd is not None:
            raise StoreError(f"{self.path}: this lock is already held")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot create the store lock file ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = _read_lock_owner(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreLockedError(self.path, owner) from None
                raise StoreError(f"{self.path}: cannot lock the store ({exc.strerror}); the file system must "
                                 "support flock(2)") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its previous owner deleted it between our open and flock: lock the new file
        previous = _read_lock_owner(fd)
        if previous:
            self.recovered = previous
            log.warning("airtrace store: recovered the stale lock %s of pid %s on host %s, which is no longer "
                        "running", self.path, previous.get("pid", "?"), previous.get("host", "?"))
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Delete the lock file and unlock; idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        finally:
            os.close(fd)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        st_fd, st_path = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st_fd.st_dev, st_fd.st_ino) == (st_path.st_dev, st_path.st_ino)


def _read_lock_owner(fd: int) -> dict:
    """The owner record of a lock file ({} when empty or unreadable)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return owner if isinstance(owner, dict) else {}
