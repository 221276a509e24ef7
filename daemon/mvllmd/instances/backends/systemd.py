"""Instances as `mvllm-instance@NAME.service` units of a systemd manager (system or user), driven by
systemctl. The template and the target are rendered from systemd/ and installed in the manager's runtime
directory by `prepare`. Units outlive the daemon; the next mvllmd re-adopts them.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from mvllmd.errors import UnitError
from mvllmd.instances.backends.protocol import UnitStatus
from mvllmd.instances.install import Scope, reload_manager, render_text, systemd_quote, unit_dir
from mvllmd.instances.spec import spec_dir

UNIT_PREFIX = "mvllm-instance@"
TEMPLATE = "mvllm-instance@.service"
TARGET = "mvllm-instances.target"


class SystemdBackend:
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
        changed = [_replace_if_changed(target_dir / name, text) for name, text in self._unit_texts().items()]
        if any(changed):
            problem = await asyncio.to_thread(reload_manager, self._scope)
            if problem:
                raise UnitError(f"systemctl daemon-reload failed: {problem}")

    def _unit_texts(self) -> dict[str, str]:
        """The template (with this mvllmd's interpreter and state directory) and the target."""
        fields = {"@PYTHON@": systemd_quote(sys.executable), "@STATE_DIR@": systemd_quote(str(self._state_dir))}
        return {TEMPLATE: render_text(TEMPLATE, fields), TARGET: render_text(TARGET, {})}

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


def _replace_if_changed(path: Path, text: str) -> bool:
    """Write `text` to `path` atomically unless it already holds it; True when it wrote."""
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True
