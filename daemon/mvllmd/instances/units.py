"""What runs an instance's engine: a systemd manager, or mvllmd's own process supervisor.

Both run `python -m mvllmd.launcher STATE_DIR NAME` and offer the same few operations: start, stop,
status, and which instances are still running (to re-adopt them after a daemon restart). Restart
policy is not theirs: the instance monitor decides (see manager.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mvllmd.errors import UnitError
from mvllmd.install import Scope, reload_manager, render_text, systemd_quote, unit_dir
from mvllmd.instances.spec import log_path, spec_dir

log = logging.getLogger(__name__)

UNIT_PREFIX = "mvllm-instance@"
TARGET = "mvllm-instances.target"
STOP_GRACE_S = 30.0


@dataclass(frozen=True)
class UnitStatus:
    running: bool
    pid: int = 0
    detail: str = ""  # how it ended, when it has
    stopped_outside: bool = False  # someone stopped it on purpose (systemctl stop): not a crash


class UnitBackend(Protocol):
    def unit_name(self, name: str) -> str: ...
    async def prepare(self) -> None: ...
    async def start(self, name: str) -> None: ...
    async def stop(self, name: str, force: bool) -> None: ...
    async def kill(self, name: str) -> None: ...
    async def status(self, name: str) -> UnitStatus: ...
    async def running(self) -> set[str]: ...
    async def close(self) -> None: ...


def launcher_argv(state_dir: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "mvllmd.launcher", str(state_dir), name]


# --- the built-in supervisor ---------------------------------------------------------------------


@dataclass
class _Child:
    pid: int
    start_ticks: int  # /proc/PID/stat field 22: with the PID, it names one process for good
    proc: subprocess.Popen[bytes] | None  # None for a process adopted after a daemon restart


class ProcessSupervisor:
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
        try:
            log_fd = os.open(log_path(self._state_dir, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UnitError(f"cannot open the log of {name}: {exc.strerror}") from exc
        try:
            proc = subprocess.Popen(
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
        child = _Child(proc.pid, _start_ticks(proc.pid), proc)
        self._children[name] = child
        self._pid_file(name).write_text(json.dumps({"pid": child.pid, "start_ticks": child.start_ticks}))

    async def stop(self, name: str, force: bool) -> None:
        """SIGTERM the engine's group (SIGKILL when forced, or after the grace); forget it once it is dead."""
        child = self._children.get(name)
        if child is not None:
            if _alive(child):
                _signal_group(child, signal.SIGKILL if force else signal.SIGTERM)
                deadline = time.monotonic() + (0 if force else STOP_GRACE_S)
                while _alive(child) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
            _signal_group(child, signal.SIGKILL)  # what is left of the group: vLLM's EngineCore, workers
            while _alive(child):
                await asyncio.sleep(0.05)
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
            name = pid_file.stem
            try:
                record = json.loads(pid_file.read_text())
                child = _Child(int(record["pid"]), int(record["start_ticks"]), None)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if _alive(child):
                self._children[name] = child
                found.add(name)
            else:
                pid_file.unlink(missing_ok=True)
        return found

    async def close(self) -> None:
        """mvllmd is stopping: its engines stop with it (systemd-managed ones do not)."""
        await asyncio.gather(*(self.stop(name, force=False) for name in list(self._children)))


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


# --- systemd -------------------------------------------------------------------------------------


class SystemdUnits:
    """Instances as `mvllm-instance@NAME.service` units of a systemd manager, driven by systemctl."""

    def __init__(self, scope: Scope, state_dir: Path, environ: dict[str, str]) -> None:
        self._scope = scope
        self._state_dir = state_dir
        self._environ = environ

    def unit_name(self, name: str) -> str:
        return f"{UNIT_PREFIX}{name}.service"

    async def prepare(self) -> None:
        """Install the template and the target when missing or out of date, then reload."""
        spec_dir(self._state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        target_dir = unit_dir(self._scope, runtime=True, environ=self._environ)
        target_dir.mkdir(parents=True, exist_ok=True)
        wanted = {
            "mvllm-instance@.service": render_text(
                "mvllm-instance@.service",
                {"@PYTHON@": systemd_quote(sys.executable), "@STATE_DIR@": systemd_quote(str(self._state_dir))},
            ),
            TARGET: render_text(TARGET, {}),
        }
        changed = False
        for file_name, text in wanted.items():
            path = target_dir / file_name
            if not path.exists() or path.read_text() != text:
                tmp = path.with_name(f".{file_name}.tmp")
                tmp.write_text(text)
                tmp.replace(path)
                changed = True
        if changed:
            problem = await asyncio.to_thread(reload_manager, self._scope)
            if problem:
                raise UnitError(f"systemctl daemon-reload failed: {problem}")

    async def _systemctl(self, *args: str, check: bool = True) -> str:
        scope = ["--user"] if self._scope == "user" else []
        proc = await asyncio.create_subprocess_exec(
            "systemctl", *scope, "--no-pager", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        if check and proc.returncode != 0:
            raise UnitError(f"systemctl {' '.join(args)}: {err.decode().strip() or f'exit status {proc.returncode}'}")
        return out.decode()

    async def start(self, name: str) -> None:
        unit = self.unit_name(name)
        await self._systemctl("reset-failed", unit, check=False)
        await self._systemctl("start", unit)

    async def stop(self, name: str, force: bool) -> None:
        unit = self.unit_name(name)
        if force:
            await self._systemctl("kill", "--signal=SIGKILL", unit, check=False)
        await self._systemctl("stop", unit)
        await self._systemctl("reset-failed", unit, check=False)

    async def kill(self, name: str) -> None:
        """SIGKILL the unit's processes; the unit ends up failed (Result=signal), which reads as a crash."""
        await self._systemctl("kill", "--signal=SIGKILL", self.unit_name(name), check=False)

    async def status(self, name: str) -> UnitStatus:
        out = await self._systemctl(
            "show", "-p", "ActiveState,SubState,MainPID,ExecMainStatus,ExecMainCode,Result", self.unit_name(name)
        )
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        pid = int(props.get("MainPID", "0") or 0)
        if props.get("ActiveState") in ("active", "activating", "reloading") and pid:
            return UnitStatus(running=True, pid=pid)
        code = props.get("ExecMainStatus", "")
        detail = f"{props.get('ActiveState', '?')} ({props.get('Result', '?')}, status {code})"
        # A unit stopped with systemctl stop (or its target) ends inactive with Result=success; one that
        # crashed, was killed, or exited non-zero ends failed. An engine that exits 0 by itself also
        # reads as stopped on purpose: a server that leaves cleanly was asked to.
        on_purpose = props.get("ActiveState") == "inactive" and props.get("Result") == "success"
        return UnitStatus(running=False, detail=detail, stopped_outside=on_purpose)

    async def running(self) -> set[str]:
        out = await self._systemctl("list-units", "--all", "--plain", "--no-legend", f"{UNIT_PREFIX}*", check=False)
        names = set()
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0].startswith(UNIT_PREFIX) and fields[2] in ("active", "activating"):
                names.add(fields[0].removeprefix(UNIT_PREFIX).removesuffix(".service"))
        return names

    async def close(self) -> None:
        """Units outlive the daemon; the next mvllmd re-adopts them."""
