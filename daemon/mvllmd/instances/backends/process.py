"""The built-in process supervisor: engines as children of mvllmd, where no systemd manager runs
(containers, laptops, CI). Each engine runs in a session of its own, so that its whole process group
(vLLM's API server, EngineCore and workers) can be signalled, and a pid file per instance (PID and start
time) lets a new daemon re-adopt the engines an earlier one left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mvllmd.errors import UnitError
from mvllmd.instances.backends.protocol import UnitStatus
from mvllmd.instances.spec import log_path, spec_dir

STOP_GRACE_S = 30.0


def launcher_argv(state_dir: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "mvllmd.instances.launcher", str(state_dir), name]


@dataclass
class _Child:
    pid: int
    start_ticks: int  # /proc/PID/stat field 22: with the PID, it names one process for good
    proc: subprocess.Popen[bytes] | None  # None for a process adopted after a daemon restart


class ProcessBackend:
    """Engines as children of mvllmd, each in its own session (so its whole process group can be
    killed), with a pid file per instance (PID and start time) for re-adoption after a daemon crash."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._children: dict[str, _Child] = {}

    def unit_name(self, name: str) -> str:
        return ""

    async def prepare(self) -> None:
        spec_dir(self._state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)

    def _pid_file(self, name: str) -> Path:
        return spec_dir(self._state_dir) / f"{name}.pid"

    async def start(self, name: str) -> None:
        proc = self._spawn(name)
        child = _Child(proc.pid, _start_ticks(proc.pid), proc)
        self._children[name] = child
        self._pid_file(name).write_text(json.dumps({"pid": child.pid, "start_ticks": child.start_ticks}))

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        """The launcher in a session of its own, its output appended to the instance's log."""
        try:
            log_fd = os.open(log_path(self._state_dir, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UnitError(f"cannot open the log of {name}: {exc.strerror}") from exc
        try:
            return subprocess.Popen(
                launcher_argv(self._state_dir, name),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,  # the launcher's own errors, before it redirects the engine's output
                stderr=log_fd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise UnitError(f"cannot start the launcher for {name}: {exc.strerror}") from exc
        finally:
            os.close(log_fd)

    async def stop(self, name: str, force: bool) -> None:
        """SIGTERM the engine's group (SIGKILL when forced, or after the grace); forget it once it is dead."""
        child = self._children.get(name)
        if child is not None:
            await _end(child, force)
        self._children.pop(name, None)
        with contextlib.suppress(FileNotFoundError):
            self._pid_file(name).unlink()

    async def kill(self, name: str) -> None:
        """SIGKILL the engine's group but keep watching it: the monitor sees the exit and restarts it."""
        child = self._children.get(name)
        if child is not None:
            _signal_group(child, signal.SIGKILL)

    async def status(self, name: str) -> UnitStatus:
        child = self._children.get(name)
        if child is None:
            return UnitStatus(running=False)
        if child.proc is not None:
            code = child.proc.poll()
            if code is None:
                return UnitStatus(running=True, pid=child.pid)
            _signal_group(child, signal.SIGKILL)  # its helpers (vLLM's EngineCore) must not outlive it
            return UnitStatus(running=False, detail=_describe_exit(code))
        if _alive(child):
            return UnitStatus(running=True, pid=child.pid)
        _signal_group(child, signal.SIGKILL)
        return UnitStatus(running=False, detail="exited (adopted after a daemon restart, so its status is unknown)")

    async def running(self) -> set[str]:
        """Adopt engines left running by a daemon that died: only a PID whose start time matches."""
        found = set()
        for pid_file in spec_dir(self._state_dir).glob("*.pid"):
            child = _read_pid_file(pid_file)
            if child is not None and _alive(child):
                self._children[pid_file.stem] = child
                found.add(pid_file.stem)
            elif child is not None:
                pid_file.unlink(missing_ok=True)
        return found

    async def close(self) -> None:
        """mvllmd is stopping: its engines stop with it (systemd-managed ones do not)."""
        await asyncio.gather(*(self.stop(name, force=False) for name in list(self._children)))


async def _end(child: _Child, force: bool) -> None:
    """SIGTERM (or SIGKILL) the group, give it the grace, then SIGKILL what is left; return once it is dead."""
    if _alive(child):
        _signal_group(child, signal.SIGKILL if force else signal.SIGTERM)
        deadline = time.monotonic() + (0 if force else STOP_GRACE_S)
        while _alive(child) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    _signal_group(child, signal.SIGKILL)  # what is left of the group: vLLM's EngineCore, workers
    while _alive(child):
        await asyncio.sleep(0.05)


def _read_pid_file(path: Path) -> _Child | None:
    """The child a pid file names, or None when the file cannot be read (it is then left alone)."""
    try:
        record = json.loads(path.read_text())
        return _Child(int(record["pid"]), int(record["start_ticks"]), None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _signal_group(child: _Child, signum: int) -> None:
    """Signal every process of the engine's group that is ours: in its group, and started no earlier
    than the engine (a recycled PID cannot make us signal a stranger)."""
    for pid in _group_members(child.pid):
        if _start_ticks(pid) >= child.start_ticks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _start_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(child: _Child) -> bool:
    if child.proc is not None and child.proc.poll() is not None:
        return False
    return _start_ticks(child.pid) == child.start_ticks


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exited with status {code}"
