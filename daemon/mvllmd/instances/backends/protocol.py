"""What every unit backend offers the instance manager: start, stop, kill, status, and which instances
are still running (to re-adopt them after a daemon restart).

Every backend runs `python -m mvllmd.instances.launcher STATE_DIR NAME`. Restart policy is not theirs:
the instance's monitor decides (see supervision.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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
