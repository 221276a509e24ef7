"""Small tmpfs file systems in a private mount namespace, for real "disk full" faults.

Recipe (measured on Debian 12 / util-linux 2.38 / Linux 6.x, as root)::

    setpriv --pdeathsig KILL -- unshare --mount --propagation private \\
        sh -c 'echo ready; exec sleep infinity'          # the anchor, PID A
    mkdir -p P                                           # on the host
    nsenter -t A -m -- mount -t tmpfs -o size=1M,mode=0755 tmpfs P
    nsenter -t A -m --wd=$PWD -- mvllmd ...              # runs inside, sees the tmpfs at P
    # the test (outside) reads and writes P's files as /proc/A/root/P/...

Why it looks like this, and what was checked:

* The anchor holds the namespace open; it is ``setpriv`` exec'ing ``unshare``
  exec'ing ``sh`` exec'ing ``sleep``, so :attr:`MountNamespace.pid` is the
  PID of all four in turn.  It is started and waited for "ready" (printed
  after ``unshare(2)``), so once the constructor returns, ``nsenter -t PID``
  and ``/proc/PID/root`` reach the new namespace, never the host's.
* Mounts made in it (:meth:`MountNamespace.mount_tmpfs`) are invisible on
  the host: there P stays the empty directory it was.  The test reaches the
  files through ``/proc/PID/root/P`` (:meth:`MountNamespace.inside`); that
  works for root (ptrace access to the anchor).  ``os.statvfs`` through it
  reports the tmpfs's own sizes (a 1 MiB tmpfs: 256 blocks of 4 KiB).
* Absolute symlinks met on a path below ``/proc/PID/root`` resolve in the
  *test's* namespace, not the anchor's: writing ``/proc/PID/root/L/f`` where
  ``L -> P`` lands in the host's P, not in the tmpfs.  So
  :meth:`~MountNamespace.inside` and :meth:`~MountNamespace.mount_tmpfs`
  resolve paths on the host first (``Path.resolve()``); do not rely on
  symlinks that live inside a tmpfs.
* ``nsenter -t PID -m -- argv`` (:meth:`MountNamespace.command`) execs argv
  in place: nsenter forks only to enter a PID namespace.  So the PID of
  ``Popen(ns.command([...]))`` is the program's own PID (checked:
  ``/proc/<popen pid>/exe`` is the program), and signals sent to it reach
  the program.  ``--wd`` is given because nsenter would otherwise start the
  program in ``/``.
* A write that does not fit fails with ENOSPC (errno 28), both for a process
  inside and for the test writing through ``inside()``.  ``resize`` is
  ``mount -o remount,size=...``: growing frees room at once; shrinking below
  what is in use fails (RuntimeError from the failed ``mount``).
  :meth:`MountNamespace.fill` uses ``posix_fallocate`` (tmpfs allocates real
  pages for it; a sparse write would take no room).
* :meth:`MountNamespace.close` SIGKILLs the anchor by PID and reaps it.  The
  namespace, and its mounts, vanish when no process is left in it: a program
  started with :meth:`~MountNamespace.command` that still runs keeps them
  alive (the caller stops its own programs first).  The host directories
  were never touched, so they are empty afterwards.
* If the test process dies without ``close()``, the anchor gets SIGKILL
  (``setpriv --pdeathsig KILL``).  The parent-death signal fires when the
  *thread* that started it exits, so create a MountNamespace on a thread
  that lives as long as it does (the test's main thread; not
  ``asyncio.to_thread``).  ``unshare --kill-child`` does not help here: it
  kills unshare's forked child when *unshare* dies, and unshare does not die
  with the test.
* Only the anchor is ever signalled, by its PID.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

_ANCHOR = ["sh", "-c", "echo ready; exec sleep infinity"]


def available() -> str | None:
    """None if a MountNamespace can be made here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (mount namespace, mount, /proc/PID/root)"
    for tool in ("unshare", "nsenter", "setpriv", "mount", "sleep"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


class MountNamespace:
    """A private mount namespace, held open by an anchor process (``sleep infinity`` under unshare),
    for tmpfs mounts the test makes."""

    def __init__(self, timeout: float = 10.0) -> None:
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--mount", "--propagation", "private", "--", *_ANCHOR],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
        )
        self.pid: int = self._proc.pid
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        if line != b"ready\n":
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            err = proc.stderr.read().decode(errors="replace").strip()
            raise RuntimeError(f"mount namespace anchor did not start (rc {proc.returncode}): {err or line!r}")
        proc.stdout.close()
        proc.stderr.close()

    def _run_inside(self, argv: Sequence[str]) -> None:
        res = subprocess.run(self.command(argv), capture_output=True, text=True, timeout=10, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed in namespace {self.pid}: {res.stderr.strip()}")

    def mount_tmpfs(self, path: Path, size: str) -> None:
        """Mount a tmpfs of *size* (mount's syntax: ``1M``, ``4096k``, ``50%``) at *path*, inside only.

        The mount point is created first (``mkdir -p``, on the host; the
        namespace sees the same directories outside its own mounts).
        """
        path = Path(path).resolve()
        path.mkdir(parents=True, exist_ok=True)
        self._run_inside(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)])

    def resize(self, path: Path, size: str) -> None:
        """Set the size of the tmpfs at *path*; fails below what is in use."""
        self._run_inside(["mount", "-o", f"remount,size={size}", str(Path(path).resolve())])

    def inside(self, path: Path) -> Path:
        """The path by which the test (outside) reaches *path* as the namespace sees it."""
        return Path(f"/proc/{self.pid}/root{Path(path).resolve()}")

    def command(self, argv: Sequence[str]) -> list[str]:
        """*argv* run inside the namespace, in the current directory; nsenter execs it in place (same PID)."""
        return ["nsenter", "-t", str(self.pid), "-m", f"--wd={os.getcwd()}", "--", *argv]

    def fill(self, path: Path, leave_bytes: int = 0) -> Path:
        """Take the free room of the file system at *path* but at least *leave_bytes* (less than one block more).

        Returns the filler file's ``inside()`` path: unlink it to free the room.
        """
        directory = self.inside(path)
        filler = directory / f".smallfs-fill-{os.getpid()}-{len(os.listdir(directory))}"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for _ in range(100):  # a program inside may take room meanwhile: measure again, take the rest
                st = os.statvfs(directory)
                size = (st.f_bavail * st.f_frsize - leave_bytes) // st.f_frsize * st.f_frsize
                if size <= 0:
                    break
                try:
                    os.posix_fallocate(fd, os.fstat(fd).st_size, size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        except BaseException:
            os.close(fd)
            filler.unlink()
            raise
        os.close(fd)
        return filler

    def close(self) -> None:
        """SIGKILL the anchor and reap it; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> MountNamespace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
