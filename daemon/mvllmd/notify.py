"""systemd's service notification protocol (sd_notify(3)): READY, STATUS, WATCHDOG, STOPPING.

Outside systemd (no NOTIFY_SOCKET) every call does nothing, so callers never ask where they run.
The variables are taken out of the environment once read (sd_notify's unset_environment), so no
child (a systemctl probe, an engine under the process supervisor) speaks for the daemon.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, MutableMapping

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: MutableMapping[str, str], pid: int) -> None:
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._watchdog_s = watchdog_interval(environ, pid)
        self._sd = sdnotify.SystemdNotifier() if self.enabled else None  # reads NOTIFY_SOCKET itself
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            environ.pop(name, None)

    def _send(self, state: str) -> None:
        if self._sd is not None:
            self._sd.notify(state)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self._send(f"STOPPING=1\nSTATUS={status}")

    async def run_watchdog(self) -> None:
        """Ping at half of WATCHDOG_USEC (sd_watchdog_enabled(3)) for as long as the event loop runs."""
        if self._watchdog_s is None:
            return
        log.debug("watchdog: pinging every %.1fs", self._watchdog_s / 2)
        while True:
            self._send("WATCHDOG=1")
            await asyncio.sleep(self._watchdog_s / 2)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout in seconds, or None when the watchdog is off or meant for another process."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return int(usec) / 1_000_000
