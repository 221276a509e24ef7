"""Which unit backend runs this host's engine servers: a systemd manager (system or user scope) or
mvllmd's own process supervisor. Users choose with `--unit-manager` (`[daemon] unit_manager`).

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


class BackendKind(enum.StrEnum):
    SYSTEMD_SYSTEM = "systemd-system"
    SYSTEMD_USER = "systemd-user"
    PROCESS = "process"


def pick_backend(choice: UnitManagerChoice, euid: int) -> BackendKind:
    """Resolve `auto`; check that an explicitly named systemd manager answers."""
    if choice == "process":
        return BackendKind.PROCESS
    if choice != "auto":
        return _answering(BackendKind(choice))
    # root prefers the system manager; other users can only start units in their own manager.
    candidates = [BackendKind.SYSTEMD_SYSTEM, BackendKind.SYSTEMD_USER] if euid == 0 else [BackendKind.SYSTEMD_USER]
    for kind in candidates:
        state = manager_state(kind)
        log.debug("unit manager %s: %s", kind, state)
        if state in ANSWERING:
            return kind
    return BackendKind.PROCESS


def _answering(kind: BackendKind) -> BackendKind:
    """`kind` when its systemd manager answers; else a ConfigError that says what it said."""
    state = manager_state(kind)
    if state not in ANSWERING:
        raise ConfigError(f"unit_manager {str(kind)!r}: no such systemd manager answers ({state}); use auto or process")
    return kind


def manager_state(kind: BackendKind) -> str:
    """What `systemctl [--user] is-system-running` says, or why it said nothing."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return "systemctl is not installed"
    scope = ["--user"] if kind is BackendKind.SYSTEMD_USER else []
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
