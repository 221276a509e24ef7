"""Advisory locks that say "one mvllmd here": flock(2) on a file that holds the owner's PID.

The kernel drops a flock when its holder dies, so a daemon killed with -9 never leaves a stale lock.
Lock files stay on disk: unlinking one would let two daemons lock two different inodes of one path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from mvllmd.errors import AlreadyRunning


class PidLock:
    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self._what = what  # e.g. "state directory /var/lib/mvllmd", for the error message
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(f"another mvllmd (pid {owner}) already uses {self._what}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
