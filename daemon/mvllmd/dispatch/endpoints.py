"""Every server the daemon sends to, one Endpoint each, shared by the jobs that use it.

`Endpoints` hands out the one Endpoint of a URL (`join`) and takes it back when a job is done with it
(`leave`); an Endpoint nobody uses is forgotten. While any is in use it watches them all on one
clock: each `metrics_interval_s` it reads every server's Prometheus /metrics (gauges.py) at once, and
each HANG_CHECK_S it looks for servers that hang (from those readings: seconds, see endpoint.py;
else after the hang timeout). Those that do are taken out, and every listener (a
running job's dispatcher) is told, so that it sends their requests elsewhere; after each reading the
listeners are told too (speeds and limits may have changed). A server whose /metrics fails just has
no gauges. The cost is per server per interval, never per sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mvllmd.config import JobSettings
from mvllmd.dispatch.endpoint import STALL_S, Endpoint
from mvllmd.transport import http
from mvllmd.transport.gauges import scrape
from mvllmd.weights.state import Weights

log = logging.getLogger(__name__)

HANG_CHECK_S = 0.25  # how often the servers are checked for a hang (a cheap look at each)


@dataclass(frozen=True)
class Tuning:
    """How the daemon treats servers; the same for every job (config.JobSettings gives the values)."""

    hang_timeout_s: float  # the fallback: nothing answered this long (a server without /metrics)
    stall_s: float = STALL_S  # token counters still this long: hung (endpoint.py says how exactly)
    metrics_interval_s: float = 1.0  # how often each server's /metrics is read; 0: never
    breaker_failures: int = 5
    breaker_cooldown_s: float = 2.0
    max_attempts: int = 6  # a retryable failure is tried again, elsewhere, up to this many times in all
    request_timeout_s: float | None = None  # a request not answered by then fails (retryable); None: never
    door_reserve: float = 0.0  # the share of each server's capacity jobs leave to the front door (endpoint.py)

    @classmethod
    def of(cls, settings: JobSettings, door_reserve: float = 0.0) -> Tuning:
        """The daemon's tuning, from its job settings and the front door's reserve (the rest are these
        defaults, the only ones)."""
        return cls(hang_timeout_s=settings.hang_timeout_s, door_reserve=door_reserve)


@dataclass(frozen=True)
class Listener:
    read: Callable[[], None]  # a round of readings is in
    lost: Callable[[Endpoint], None]  # its requests in flight go elsewhere now: it hung, or an update aborts them


class Endpoints:
    def __init__(self, tuning: Tuning, weights_of: Callable[[str], Weights | None] = lambda url: None) -> None:
        self.tuning = tuning
        self._weights_of = weights_of  # a server's weights (its instance's), by URL; None: it has none
        self._by_url: dict[str, Endpoint] = {}
        self._listeners: list[Listener] = []
        self._http = http.Client()
        self._watch: asyncio.Task[None] | None = None

    def join(self, url: str, capacity: int, api_key: str = "", shares: bool = True) -> Endpoint:
        """The endpoint of `url`, for one more user: a job, which `shares` the server's limit with the
        other jobs, or the front door, which takes no share (its requests count in the load)."""
        endpoint = self._by_url.get(url)
        if endpoint is None or endpoint.api_key != api_key:
            endpoint = Endpoint(url, capacity, api_key, failures=self.tuning.breaker_failures,
                                cooldown_s=self.tuning.breaker_cooldown_s, stall_s=self.tuning.stall_s,
                                door_reserve=self.tuning.door_reserve, weights=self._weights_of(url))  # fmt: skip
            self._by_url[url] = endpoint
        endpoint.join(capacity, shares)
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watch_all())
        return endpoint

    def leave(self, endpoint: Endpoint, shares: bool = True) -> None:
        endpoint.leave(shares)
        if not endpoint.used and self._by_url.get(endpoint.url) is endpoint:
            del self._by_url[endpoint.url]  # its requests still landing count on the object they hold

    def find(self, url: str) -> Endpoint | None:
        """The endpoint of `url` while anyone uses it (and so its gauges are read), else None. To read."""
        return self._by_url.get(url)

    def all(self) -> list[Endpoint]:
        """Every server in use now, one Endpoint each."""
        return list(self._by_url.values())

    def evacuate(self, endpoint: Endpoint) -> None:
        """Every user sends its requests in flight on `endpoint` elsewhere, now."""
        for listener in list(self._listeners):
            listener.lost(endpoint)

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        self._http.close()

    async def _watch_all(self) -> None:
        """Check for hangs every HANG_CHECK_S and read the gauges every interval, while anyone uses a server."""
        interval = self.tuning.metrics_interval_s
        next_reading = time.monotonic()
        while self._by_url:
            try:
                self._check_hangs()
                if interval > 0 and time.monotonic() >= next_reading:
                    await self._read_all()
                    next_reading = time.monotonic() + interval
            except Exception:  # a bug here must not stop the watch: jobs rely on it to see hangs
                log.exception("watching the servers failed")
            wait = HANG_CHECK_S if interval <= 0 else max(0.0, min(HANG_CHECK_S, next_reading - time.monotonic()))
            await asyncio.sleep(wait)

    def _check_hangs(self) -> None:
        now = time.monotonic()
        for endpoint in list(self._by_url.values()):
            endpoint.tick(now)
            why = endpoint.hung(now, self.tuning.hang_timeout_s)
            if why:
                endpoint.take_out_hung(now, self.tuning.hang_timeout_s, why)
                self.evacuate(endpoint)

    async def _read_all(self) -> None:
        endpoints = list(self._by_url.values())
        for endpoint in endpoints:
            endpoint.polling()
        timeout = max(1.0, min(2.0, self.tuning.metrics_interval_s))  # at least 1 s: a loaded machine is slow
        readings = await asyncio.gather(
            *(scrape(self._http, e.url, e.api_key, timeout) for e in endpoints), return_exceptions=True
        )
        now = time.monotonic()
        for endpoint, reading in zip(endpoints, readings, strict=True):
            if isinstance(reading, dict):
                endpoint.read(reading, now)
            elif isinstance(reading, (http.HttpError, OSError, TimeoutError, ValueError)):
                endpoint.unreadable()
            elif isinstance(reading, BaseException):
                raise reading
        for listener in list(self._listeners):
            listener.read()
