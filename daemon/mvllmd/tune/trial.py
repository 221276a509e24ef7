"""One trial's job: the workload's prompts sent to the trial's instances, measured until sure or out of time.

The trial's job is a dispatcher of its own (dispatch/), least-loaded over the trial's instances with every
sample allowed in flight (each instance fills its own batch), fed from the workload; nothing is written.
Each interval the meter (measure.py) reads the instances; the ramp is left out, and the trial stops when
its window ends, when its figure is sure, or when its prompts run out (the tail is left out too).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mvllm.jobs import JobSpec, Policy, Sample, Sampling
from mvllmd.dispatch.endpoints import Endpoints, Tuning
from mvllmd.dispatch.flights import Work
from mvllmd.dispatch.loop import Dispatcher
from mvllmd.errors import MvllmError
from mvllmd.transport import http
from mvllmd.tune.measure import Figure, Interval, Meter, Reading, figure, read_all, sure
from mvllmd.tune.workload import Workload

INTERVALS = 20  # a window holds about this many intervals
SHORTEST_INTERVAL_S, LONGEST_INTERVAL_S = 0.25, 5.0
WARMUP_SHARE = 1 / 3  # of the window: the ramp ends by then whatever the counts say
FEED_AHEAD = 2  # prompts waiting to be sent, per sample the job may have in flight
MOST_MISSED = 5  # readings in a row that may fail (a server too busy to answer /metrics in time)


class TrialFailed(MvllmError):
    """The trial could not be measured; the sweep goes on to the next split."""


@dataclass(frozen=True)
class Server:
    url: str
    api_key: str
    capacity: int  # its max_num_seqs


@dataclass(frozen=True)
class TrialJob:
    """What every trial of a sweep sends."""

    model: str  # the served name
    workload: Workload
    sampling: Sampling
    num_samples: int
    tuning: Tuning  # how the job treats its servers


@dataclass
class Outcome:
    figure: Figure | None = None
    simulated: bool = False  # the figures are per simulated second (every instance showed the sim's clock)
    measured_s: float = 0.0  # of the steady state, on that clock
    ran_out: bool = False  # the prompts ran out before the window ended
    steady: list[Interval] = field(default_factory=list)


Progress = Callable[[bool, float], None]  # (warming up, fraction of the phase)


async def measure(servers: list[Server], job: TrialJob, window_s: float, progress: Progress) -> Outcome:
    """Run the trial's job on `servers` for at most `window_s` wall seconds; its steady state's figure."""
    endpoints = Endpoints(job.tuning)
    capacity = sum(s.capacity for s in servers)
    spec = JobSpec(Path("/dev/null"), Path("/dev/null"), model=job.model, sampling=job.sampling,
                   num_samples=job.num_samples, policy=Policy.LEAST_LOADED, hedge=False,
                   max_concurrent=capacity)  # fmt: skip
    done: set[tuple[int, int]] = set()

    async def deliver(samples: list[Sample]) -> None:
        done.update((s.prompt_index, s.sample_index) for s in samples)

    dispatcher = Dispatcher(spec, endpoints, deliver, lambda p, s: (p, s) in done)
    for server in servers:
        dispatcher.join(server.url, server.capacity, server.api_key)
    running = asyncio.create_task(dispatcher.run())
    feeding = asyncio.create_task(_feed(dispatcher, job, capacity))
    watch = _Watch(servers, dispatcher, feeding, running)
    try:
        return await watch.run(window_s, progress)
    finally:
        dispatcher.drop_backlog()
        for task in (feeding, running):
            task.cancel()
        await asyncio.gather(feeding, running, return_exceptions=True)
        watch.client.close()
        await endpoints.close()


async def _feed(dispatcher: Dispatcher, job: TrialJob, capacity: int) -> None:
    ahead = max(1, capacity * FEED_AHEAD // job.num_samples)
    for index, prompt in enumerate(job.workload.prompts):
        if dispatcher.backlog > ahead:
            await dispatcher.room(ahead)
        if not dispatcher.accepting:
            return
        dispatcher.add(Work(index, prompt, list(range(job.num_samples))))
    dispatcher.close_input()


class _Watch:
    """Reads the trial's instances each interval, and tells the ramp, the steady state and the tail apart."""

    def __init__(self, servers: list[Server], dispatcher: Dispatcher, feeding: asyncio.Task[None],
                 running: asyncio.Task[None]) -> None:  # fmt: skip
        self.client = http.Client()
        self._targets = [(s.url, s.api_key) for s in servers]
        self._dispatcher, self._feeding, self._running = dispatcher, feeding, running
        self._missed = 0  # readings in a row that failed

    async def run(self, window_s: float, progress: Progress) -> Outcome:
        interval_s = min(LONGEST_INTERVAL_S, max(SHORTEST_INTERVAL_S, window_s / INTERVALS))
        meter, outcome = Meter(), Outcome()
        started = time.monotonic()
        batch = 0.0  # the most sequences seen running at once
        warm = False
        while time.monotonic() < started + window_s:
            await _sleep_unless_ended(interval_s, self._running)
            outcome.ran_out = self._ran_out()
            if outcome.ran_out:
                break
            readings = await self._read()
            interval = meter.add(readings) if readings is not None else None
            if interval is None:
                continue
            batch = max(batch, interval.running)
            elapsed = time.monotonic() - started
            if not warm:
                warm = (batch > 0 and interval.finished >= batch) or elapsed >= WARMUP_SHARE * window_s
                progress(True, min(1.0, interval.finished / batch if batch else 0.0))
                continue
            outcome.steady.append(interval)
            outcome.measured_s += interval.span_s
            progress(False, min(1.0, elapsed / window_s))
            if sure(outcome.steady):
                break
        outcome.figure = figure(outcome.steady)
        outcome.simulated = meter.simulated
        return outcome

    async def _read(self) -> list[Reading] | None:
        """Every instance's counters; None when one does not answer this time (the next interval then spans
        two), and TrialFailed after MOST_MISSED in a row."""
        try:
            readings = await read_all(self.client, self._targets, time.monotonic())
        except (http.HttpError, OSError, TimeoutError, ValueError) as exc:
            self._missed += 1
            if self._missed >= MOST_MISSED:
                cause = str(exc) or type(exc).__name__
                missed = f"the instances' /metrics did not answer {self._missed} times in a row ({cause})"
                raise TrialFailed(missed) from None
            return None
        self._missed = 0
        return readings

    def _ran_out(self) -> bool:
        """The dispatcher finished every prompt, or the last ones are all sent: the tail, not measured."""
        if self._running.done():
            self._running.result()  # the dispatcher's own fault, raised
            return True
        return self._feeding.done() and self._dispatcher.backlog == 0


async def _sleep_unless_ended(seconds: float, running: asyncio.Task[None]) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(running), seconds)
