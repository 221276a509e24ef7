"""A trial's measurement: each instance's own counters, read from its /metrics, interval by interval.

Every `interval` the trial reads each instance's generated tokens (`vllm:generation_tokens_total`),
finished sequences (`vllm:request_success_total`: a request of n choices counts n) and running ones.
An interval's rates are the sum over instances of each one's counts over its own clock: the
simulator's simulated clock (`mvllm_sim:clock_seconds`) when every instance shows one, so that its
figures hold at any --time-scale, else the wall clock.

The steady state leaves out the ramp and the tail. The ramp (warm-up) lasts until the instances have
finished as many sequences as they ran at once at the most, so that a whole batch has turned over;
the tail begins when the trial's prompts run out (the trial stops there). Its figure is the median
interval; the spread, the lowest and the highest. It is sure enough, and the trial may end early,
once MIN_INTERVALS intervals give a mean whose standard error is under SURE of it.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass, field

from mvllmd.transport import gauges, http

CLOCK = "mvllm_sim:clock_seconds"
FINISHED = "vllm:request_success_total"
NAMES = (gauges.RUNNING, gauges.WAITING, gauges.GENERATED, FINISHED, CLOCK)
MIN_INTERVALS = 8
SURE = 0.02  # the standard error of the mean, over the mean, under which the figure is sure enough
READ_TIMEOUT_S = 5.0  # a server busy with a full batch may be slow to answer /metrics


@dataclass(frozen=True)
class Reading:
    tokens: float
    finished: float
    running: float
    clock: float | None  # the simulator's clock; None for an engine without one
    wall: float


@dataclass(frozen=True)
class Interval:
    tokens_per_s: float
    samples_per_s: float
    running: float  # sequences running at its end, summed over the instances
    finished: float  # sequences finished since the first reading, summed
    span_s: float  # its length on the meter's clock (the instances' mean)


async def read(client: http.Client, url: str, api_key: str, now: float) -> Reading:
    """One instance's counters; raises as gauges.scrape does."""
    values = await gauges.scrape(client, url, api_key, READ_TIMEOUT_S, NAMES)
    return Reading(values.get(gauges.GENERATED, 0.0), values.get(FINISHED, 0.0), values[gauges.RUNNING],
                   values.get(CLOCK), now)  # fmt: skip


@dataclass
class Meter:
    """The readings of a trial's instances, turned into intervals."""

    first: list[Reading] = field(default_factory=list)
    last: list[Reading] = field(default_factory=list)
    simulated: bool = True  # every reading so far had the simulator's clock

    def add(self, readings: list[Reading]) -> Interval | None:
        """The interval since the last readings (None for the first)."""
        self.simulated = self.simulated and all(r.clock is not None for r in readings)
        before, self.last = self.last, readings
        if not before:
            self.first = readings
            return None
        tokens = samples = 0.0
        spans = [self._span(old, new) for old, new in zip(before, readings, strict=True)]
        for old, new, span in zip(before, readings, spans, strict=True):
            if span > 0:
                tokens += (new.tokens - old.tokens) / span
                samples += (new.finished - old.finished) / span
        finished = sum(r.finished for r in readings) - sum(r.finished for r in self.first)
        return Interval(tokens, samples, sum(r.running for r in readings), finished, sum(spans) / len(spans))

    def _span(self, old: Reading, new: Reading) -> float:
        if self.simulated and old.clock is not None and new.clock is not None:
            return new.clock - old.clock
        return new.wall - old.wall


async def read_all(client: http.Client, targets: list[tuple[str, str]], now: float) -> list[Reading]:
    return list(await asyncio.gather(*(read(client, url, key, now) for url, key in targets)))


@dataclass(frozen=True)
class Figure:
    tokens_per_s: float
    samples_per_s: float
    low: float
    high: float
    intervals: tuple[float, ...]


def figure(steady: list[Interval]) -> Figure | None:
    if not steady:
        return None
    rates = [i.tokens_per_s for i in steady]
    return Figure(statistics.median(rates), statistics.median(i.samples_per_s for i in steady), min(rates),
                  max(rates), tuple(rates))  # fmt: skip


def sure(steady: list[Interval]) -> bool:
    """Enough intervals, close enough together, for the figure to stand."""
    if len(steady) < MIN_INTERVALS:
        return False
    rates = [i.tokens_per_s for i in steady]
    mean = statistics.fmean(rates)
    return mean > 0 and statistics.stdev(rates) / len(rates) ** 0.5 < SURE * mean
