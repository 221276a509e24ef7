"""Which unit manager runs this host's engine servers: systemd (system or user scope) or mvllmd's own.

`auto` picks a systemd manager only when it answers `systemctl [--user] is-system-running`: the existence
of /run/systemd/system proves nothing (a user manager in a container creates it too).
"""

from __future__ import annotations

import enum
import logging
import shutil
import subprocess

from mvllmd.config import UnitManagerChoice
from mvllmd.errors import ConfigError

log = logging.getLogger(__name__)

# States in which the manager answers and can start units (systemctl(1), is-system-running).
ANSWERING = frozenset({"initializing", "starting", "running", "degraded", "maintenance"})
PROBE_TIMEOUT_S = 5.0


class UnitManager(enum.StrEnum):
    SYSTEMD_SYSTEM = "systemd-system"
    SYSTEMD_USER = "systemd-user"
    PROCESS = "process"


def pick_unit_manager(choice: UnitManagerChoice, euid: int) -> UnitManager:
    """Resolve `auto`; check that an explicitly named systemd manager answers."""
    if choice == "process":
        return UnitManager.PROCESS
    if choice != "auto":
        manager = UnitManager(choice)
        state = manager_state(manager)
        if state not in ANSWERING:
            raise ConfigError(
                f"unit_manager {choice!r}: no such systemd manager answers ({state}); use auto or process"
            )
        return manager
    # root prefers the system manager; other users can only start units in their own manager.
    candidates = [UnitManager.SYSTEMD_SYSTEM, UnitManager.SYSTEMD_USER] if euid == 0 else [UnitManager.SYSTEMD_USER]
    for manager in candidates:
        state = manager_state(manager)
        log.debug("unit manager %s: %s", manager, state)
        if state in ANSWERING:
            return manager
    return UnitManager.PROCESS


def manager_state(manager: UnitManager) -> str:
    """What `systemctl [--user] is-system-running` says, or why it said nothing."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return "systemctl is not installed"
    scope = ["--user"] if manager is UnitManager.SYSTEMD_USER else []
    try:
        done = subprocess.run(
            [systemctl, *scope, "is-system-running"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"systemctl failed: {exc}"
    return done.stdout.strip() or done.stderr.strip() or f"exit status {done.returncode}"
