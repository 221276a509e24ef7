"""The health watch of one external server: READY, UNHEALTHY (hung included), and back; nothing more.

The instances' probes (instances/health.py) judge it, as they judge an instance: /health and /v1/models
for being up; the token counters of /metrics for progress, and when they stand still for the hang
timeout, a one-token probe request with a deadline. mvllmd never restarts or kills an external server:
one that is down stays UNHEALTHY, out of jobs and the front door, until it answers again.
"""

from __future__ import annotations

import asyncio
import logging

from mvllmd.config import InstanceSettings
from mvllmd.external.state import Changes, ExternalServer
from mvllmd.instances.health import Prober, Progress
from mvllmd.instances.spec import InstanceState

log = logging.getLogger(__name__)


class Watch:
    def __init__(self, server: ExternalServer, changes: Changes, settings: InstanceSettings) -> None:
        self._server = server
        self._changes = changes
        self._settings = settings
        self._progress = Progress()

    async def run(self, prober: Prober) -> None:
        """Check at once, then every probe interval, until cancelled (detach, daemon stop)."""
        try:
            while True:
                try:
                    await self.check(prober)
                except Exception:  # one bad round must not end the watch
                    log.exception("external server %s: health check failed", self._server.name)
                await asyncio.sleep(self._settings.probe_interval_s)
        finally:
            await prober.close()

    async def check(self, prober: Prober) -> None:
        """One look: READY when it answers and progresses, else UNHEALTHY with the reason."""
        ok, why = await prober.ready()
        if ok:
            ok, why = await self._progress.check(prober, self._settings.hang_timeout_s)
        if ok:
            self._changes.set_state(self._server, InstanceState.READY, "")
        else:
            self._changes.set_state(self._server, InstanceState.UNHEALTHY, why)
