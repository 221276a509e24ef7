"""The monitor of one instance: it judges the engine's health and restarts it, for every backend alike
(systemd units run with Restart=no).

- an engine not READY within `start_timeout_s` of a (re)start is stopped and FAILED;
- an engine that exits before it was ever READY is FAILED at once: a model that cannot load, a bad
  argument or a missing library would fail again, and looping hides the error;
- an engine that exits after it was READY is started again, with backoff, up to `max_restarts` times
  in RESTART_WINDOW_S, then FAILED;
- an engine UNHEALTHY for longer than `hang_timeout_s` is killed and started again, on the same budget;
  one held on purpose (its weights are being updated, or it sleeps) is not judged by its progress;
- an engine stopped outside mvllmd (`systemctl stop mvllm-instances.target`) is forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from mvllmd.config import InstanceSettings
from mvllmd.errors import UnitError
from mvllmd.instances.backends.protocol import UnitBackend
from mvllmd.instances.health import Prober, Progress
from mvllmd.instances.logs import last_lines
from mvllmd.instances.spec import InstanceState, log_path
from mvllmd.instances.state import Events, Instance

log = logging.getLogger(__name__)

RESTART_WINDOW_S = 300.0
MAX_BACKOFF_S = 30.0
STARTING_PROBE_S = 0.2  # while an engine starts, look often: READY as soon as it is, not a probe interval later
STARTING = (InstanceState.STARTING, InstanceState.RESTARTING)

Forget = Callable[[Instance], Awaitable[None]]


@dataclass
class _Progress(Progress):
    """What the monitor remembers between rounds."""

    unhealthy_since: float | None = None

    def reset(self) -> None:
        self.last_tokens, self.last_progress, self.unhealthy_since = None, time.monotonic(), None


class Monitor:
    """Watches one instance until it is FAILED or forgotten: a round every probe interval."""

    def __init__(
        self,
        inst: Instance,
        backend: UnitBackend,
        events: Events,
        *,
        settings: InstanceSettings,
        state_dir: Path,
        forget: Forget,
    ) -> None:
        self._inst = inst
        self._backend = backend
        self._settings = settings
        self._events = events
        self._state_dir = state_dir
        self._forget = forget  # the manager's: stop it, drop its spec, list it no more
        self._progress = _Progress()

    async def run(self) -> None:
        prober = Prober(self._inst.spec, self._inst.api_key or None)
        try:
            while self._inst.state is not InstanceState.FAILED:
                await asyncio.sleep(self._interval())
                try:
                    if not await self._round(prober):
                        return
                except Exception:  # one bad round (systemctl, the log, a probe) must not end the watch
                    log.exception("instance %s: monitoring round failed", self._inst.name)
        finally:
            await prober.close()

    def _interval(self) -> float:
        interval = self._settings.probe_interval_s
        return min(interval, STARTING_PROBE_S) if self._inst.state in STARTING else interval

    async def _round(self, prober: Prober) -> bool:
        """One look at the instance; False once there is nothing more to watch."""
        inst = self._inst
        status = await self._backend.status(inst.name)
        if status.stopped_outside:  # e.g. `systemctl stop mvllm-instances.target`
            log.info("instance %s was stopped outside mvllmd; forgetting it", inst.name)
            await self._forget(inst)
            return False
        if not status.running:
            await self._on_exit(status.detail)
            self._progress.reset()
            return True
        inst.pid = status.pid
        ok, why = await prober.ready()
        if inst.state in STARTING:
            await self._starting(ok, why)
            return True
        if ok and not inst.weights.held:  # held: paused on purpose (an update, a sleep), making nothing
            ok, why = await self._progressing(prober)
        elif ok:
            self._progress.made()
        await self._judge(ok, why)
        return True

    async def _starting(self, ok: bool, why: str) -> None:
        """READY once it answers; FAILED when it does not in time."""
        inst, timeout = self._inst, self._settings.start_timeout_s
        if ok:
            self._became_ready()
            self._progress.made()
        elif time.monotonic() - inst.started_round > timeout:
            await self._backend.stop(inst.name, force=True)
            self._events.set_state(inst, InstanceState.FAILED, f"not ready after {timeout:g}s: {why}")
        else:
            inst.message = why

    async def _progressing(self, prober: Prober) -> tuple[bool, str]:
        """Did the engine make progress lately? Its token counters say so, or else a probe request."""
        return await self._progress.check(prober, self._settings.hang_timeout_s)

    async def _judge(self, ok: bool, why: str) -> None:
        """READY again when healthy; UNHEALTHY otherwise, and killed (then restarted) if it lasts."""
        inst, progress = self._inst, self._progress
        if ok:
            progress.unhealthy_since = None
            if inst.state is InstanceState.UNHEALTHY:
                self._events.set_state(inst, InstanceState.READY, "recovered")
            return
        now = time.monotonic()
        progress.unhealthy_since = progress.unhealthy_since or now
        if inst.state is not InstanceState.UNHEALTHY:
            self._events.set_state(inst, InstanceState.UNHEALTHY, why)
        if now - progress.unhealthy_since >= self._settings.hang_timeout_s:
            log.warning("instance %s: unhealthy for too long; killing it to start it again", inst.name)
            await self._backend.kill(inst.name)  # the next round sees the exit and restarts it

    def _became_ready(self) -> None:
        inst = self._inst
        if not inst.ever_ready:
            inst.ever_ready = True
            inst.ready_after_s = time.monotonic() - inst.started
        self._events.set_state(inst, InstanceState.READY, "")

    async def _on_exit(self, detail: str) -> None:
        """FAILED if it never was READY or has used its restarts; else started again after a backoff."""
        inst = self._inst
        why = f"{detail}; log: {' | '.join(last_lines(log_path(self._state_dir, inst.name), 3)[1]) or 'empty'}"
        if not inst.ever_ready:
            self._events.set_state(inst, InstanceState.FAILED, f"the engine exited before it was ever ready: {why}")
            return
        now = time.monotonic()
        recent = [t for t in inst.restarts if now - t < RESTART_WINDOW_S]
        if len(recent) >= self._settings.max_restarts:
            message = f"{len(recent)} restarts in {RESTART_WINDOW_S:.0f}s: {why}"
            self._events.set_state(inst, InstanceState.FAILED, message)
            return
        self._events.set_state(inst, InstanceState.RESTARTING, why)
        await asyncio.sleep(min(MAX_BACKOFF_S, 2.0 ** len(recent) - 1))
        inst.restarts = [*recent, time.monotonic()]
        await self._restart()

    async def _restart(self) -> None:
        self._inst.started_round = time.monotonic()
        try:
            await self._backend.start(self._inst.name)
        except UnitError as exc:
            self._events.set_state(self._inst, InstanceState.FAILED, str(exc))
