"""Drives the engine in wall time: simulated seconds times --time-scale.

The wall-clock target of each step is computed from a fixed anchor, so waits do not drift; at a small
time scale several steps run back to back before the loop sleeps.

The simulated clock (`now_sim`, /metrics' mvllm_sim:clock_seconds) is the engine's own while it steps:
it advances by each step's time, exactly, at the step that makes the step's tokens, so tokens over
clock between two readings is tokens per simulated second at any time scale, even one the CPU cannot
keep up with. While the engine does not step (idle, paused, or hung), the clock follows the wall
clock divided by the time scale, from where the steps left it, so an idle server ages as a real one
does (a paused engine's queue ages); a request that reaches an idle engine makes it the engine's again
at once (`submit`). With --time-scale 0 the engine runs as fast as it can and idle
time does not count: the clock is the sum of the step times (and of the stretches of other work).

Work that is not a step (a weights reload) occupies the engine for a stretch of simulated time, as a
utility call occupies vLLM's engine core between two steps: nothing is stepped meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

from mvllm_sim.engine import Engine, SimRequest

log = logging.getLogger(__name__)

YIELD_EVERY_STEPS = 8  # let the HTTP side run at least this often when no sleep is due
MIN_SLEEP_S = 0.0005


class Runner:
    def __init__(
        self,
        engine: Engine,
        time_scale: float,
        crash_at_s: float | None = None,
        hung: Callable[[], bool] = lambda: False,
    ) -> None:
        self.engine = engine
        self.time_scale = time_scale
        self._crash_at_s = crash_at_s
        self._hung = hung
        self._wake = asyncio.Event()
        self._occupied = 0  # stretches of other work under way
        self._stepping = False  # the last step() made a step: the clock is the engine's
        self._anchor_wall = time.monotonic()
        self._anchor_sim = 0.0

    def submit(self, req: SimRequest) -> None:
        if not self._stepping:
            # The idle time passed in simulated time too; and the engine steps from this arrival on, as
            # vLLM's busy loop does, so the wall time this process takes to come round to its loop (a
            # starved host's) is not the request's wait: a burst reaching an idle engine arrives at one
            # simulated instant and is admitted then.
            self._resync()
            self._stepping = True
        self.engine.add(req)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def update(self, change: Callable[[], None]) -> None:
        """Change what the engine may run (lift a pause), then wake it. An idle engine's clock first
        catches up with the wall clock: the time it stood still counts."""
        if not self._stepping:
            self._resync()
        change()
        self._wake.set()

    async def occupy(self, seconds: float) -> None:
        """Hold the engine for `seconds` of simulated time, after the step under way: no step runs."""
        self._occupied += 1
        try:
            if not self._stepping:
                self._resync()
            self.engine.now += seconds
            delay = 0.0
            if self.time_scale > 0:
                delay = self._anchor_wall + (self.engine.now - self._anchor_sim) * self.time_scale - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
        finally:
            self._occupied -= 1
            self._wake.set()

    def now_sim(self) -> float:
        """The simulated clock: the engine's while it steps, else advanced with the wall clock (see above)."""
        if self._stepping or self.time_scale == 0:
            return self.engine.now
        return max(self.engine.now, self._anchor_sim + (time.monotonic() - self._anchor_wall) / self.time_scale)

    async def run(self) -> None:
        steps = 0
        while True:
            self._check_crash()
            if self._hung():
                self._stop_stepping()
                await asyncio.Event().wait()  # a stuck engine: nothing is ever stepped again
            if self._occupied:
                await self._idle()
                continue
            if not self._stepping:
                self._resync()  # the first step starts from the clock as it reads now
            dt = self.engine.step()
            if dt is None:
                self._stop_stepping()
                await self._idle()
                continue
            self._stepping = True
            steps += 1
            if self.time_scale > 0:
                due = self._anchor_wall + (self.engine.now - self._anchor_sim) * self.time_scale
                delay = due - time.monotonic()
                if delay > MIN_SLEEP_S:
                    await asyncio.sleep(delay)
                    continue
            if steps % YIELD_EVERY_STEPS == 0 or self.time_scale == 0:
                await asyncio.sleep(0)

    async def _idle(self) -> None:
        self._wake.clear()
        timeout = None
        if self._crash_at_s is not None and self.time_scale > 0:  # an idle server still dies on time
            timeout = max(0.0, (self._crash_at_s - self.now_sim()) * self.time_scale)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _resync(self) -> None:
        self.engine.now = self.now_sim()
        self._anchor_wall, self._anchor_sim = time.monotonic(), self.engine.now

    def _stop_stepping(self) -> None:
        """The engine stops stepping: from here its clock follows the wall clock, from where the steps
        left it (had the steps fallen behind the wall clock, the lag is not made up as idle time)."""
        if self._stepping:
            self._stepping = False
            self._anchor_wall, self._anchor_sim = time.monotonic(), self.engine.now

    def _check_crash(self) -> None:
        if self._crash_at_s is not None and self.now_sim() >= self._crash_at_s:
            log.error("injected crash at simulated %.3fs", self.engine.now)
            os._exit(70)
