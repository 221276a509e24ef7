"""The dispatcher: samples to endpoints, balanced, retried, hedged at the tail, around broken servers.

Work is a queue of `Work` items: one prompt and the sample indexes it still needs. The dispatcher
keeps at most `max_concurrent` samples in flight overall, and at most each endpoint's capacity in
effect (`limit`: its `max_num_seqs` at first) on each, counting other clients' sequences there.

Gauges: every `metrics_interval_s` each server's Prometheus /metrics is read (gauges.py): requests
running and waiting, tokens generated. Sequences running or waiting beyond ours are other clients'
load. A server that keeps requests waiting (`WAITING_POLLS` readings in a row) has its limit lowered
toward what it runs; with none waiting the limit grows back toward the capacity. A server whose
/metrics fails has no gauges, and is dispatched to without them.

Policies:

- `least-loaded` (the default) sends work where it will be done soonest: to the endpoint with the
  least load (in-flight samples and other clients' sequences) per unit of its speed (the peak
  generation rate its gauges have shown, when every endpoint has gauges; else the samples it
  completed per second, smoothed); a slower endpoint holds less, in proportion to its speed. A
  prompt's samples go as one n=k request (the server prefills the prompt once) until the queue runs
  dry; from then on, what is left is split into single samples to spread across endpoints. The
  tail's long work must not be left stranded on slow endpoints:
  - Moves, for a job whose samples can be continued elsewhere (streams.movable: unseeded, no stop
    strings, a max_tokens). Its requests stream (with two endpoints or more), so the dispatcher knows
    what each sample has made, and a choice that finishes frees its place at once. In the tail,
    running samples move from endpoints to ones at least MOVE_GAIN times faster where a token would
    take at most 1/MOVE_GAIN of the time (`_move`), once the server says they end with a whole
    character (`_check_and_move`): the request is cancelled, its finished choices kept, and each
    unfinished one continues on the faster endpoint from the tokens it made, as the same sample
    (streams.py).
  - Copies (a hedge), for other jobs: requests are copied from where they go slowly onto endpoints
    where they will go at least twice as fast: by the servers' decode step (seconds per token of a
    running sequence, from the gauges, grown in proportion to the batch the copies add) when every
    endpoint has gauges, else by how long each endpoint's requests in flight take to drain. The
    first answer wins, the other is cancelled, and each sample is written once (DoneMap). A seeded
    copy asks for the same samples as its original; an unseeded one is a new draw, so keeping the
    first answer favours shorter samples for the requests copied: an unseeded job copies at most
    HEDGE_BUDGET (2%) of its samples. And the end game: an endpoint whose requests take longer
    (smoothed latency) than the job has left (samples left over the summed completion speed) is sent
    nothing new, unless it is the quickest there is.
  `hedge=False` (`--no-hedge`) turns the tail's moves and copies off.
- `round-robin`, the seed's: endpoints in turn whatever they already hold (only `max_concurrent`
  bounds it), one request per prompt's samples, no hedging.

Seeded jobs: a request asks for a contiguous run of a prompt's samples (vLLM gives choice i the
request's seed + i; see requests.py), so work is cut at the first gap in its sample indexes.

Failures: connection errors, timeouts, 429 and 5xx are retried elsewhere with backoff, up to
`max_attempts`; then, like a permanent failure (a 4xx), the samples are recorded with their `error`.
An endpoint that fails `breaker_failures` times in a row is taken out for a cooldown that doubles
each time, then let back in with one request. Slow answers never count against it: long generations
are normal. An endpoint with requests in flight that completes nothing for `hang_timeout_s` is
treated as hung: its requests are cancelled and sent elsewhere, and it is taken out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from mvllm.jobs import JobSpec, Policy, Sample
from mvllmd.jobs import http, streams
from mvllmd.jobs.gauges import Gauges, scrape
from mvllmd.jobs.requests import RequestFailed, ends_whole, send
from mvllmd.jobs.streams import Prefix, Stream

log = logging.getLogger(__name__)

SPEED_HALF_LIFE_S = 10.0
WAITING_POLLS = 3  # readings in a row with requests waiting before a server is sent less
HEDGE_BUDGET = 0.02  # unseeded: at most this share of a job's samples is asked for again by copies
MOVE_GAIN = 1.3  # a sample moves where a token takes at most 1/MOVE_GAIN of the time (balance_model.py)
# A token's time is taken as the batch over the server's rate, the batch counted as at least this: a
# small batch's step is bound by reading the weights, not by the batch. Lower than where that bound
# ends (about 200 sequences for an 8B model on an H100, profiles.toml), which moved too eagerly in
# benchmarks/balance_model.py (1.20 x the bound at 256, 1.18 at 128, 1.17 at 64).
MOVE_MIN_BATCH = 64


@dataclass
class Work:
    prompt_index: int
    prompt: str | list[dict[str, str]] | None
    samples: list[int]
    attempts: int = 0
    last_error: str = ""
    prefix: Prefix | None = None  # a moved sample (one): what it had made


@dataclass(eq=False)
class Endpoint:
    url: str  # base URL, without /v1
    capacity: int  # max_num_seqs: in-flight samples it can run at once
    api_key: str = ""
    retired: bool = False  # gone (its instance stopped or failed): nothing new is sent to it
    inflight: int = 0
    completed: int = 0
    tokens: int = 0
    failures_in_a_row: int = 0
    open_until: float = 0.0  # circuit breaker: out until then
    cooldown_s: float = 0.0
    speed: float = 0.0  # samples per second, smoothed; 0 until measured
    latency_s: float = 0.0  # a request's time from sent to answered, smoothed; 0 until measured
    last_completion: float = field(default_factory=time.monotonic)
    _speed_at: float = field(default_factory=time.monotonic)
    requests: dict[int, _Flight] = field(default_factory=dict)
    gauges: Gauges = field(default_factory=Gauges)
    limit: int = 0  # the capacity in effect: lowered while the server queues what it is sent
    external: int = 0  # sequences on the server that are not ours (other clients), from its gauges
    reserved: int = 0  # samples that will move to it once their check is back
    # What other jobs of this daemon have in flight there: their share is theirs already (see
    # set_capacity), so they do not count as outside load too.
    siblings: Callable[[], int] = field(default=lambda: 0)
    _inflight_at_poll: int = 0
    _siblings_at_poll: int = 0

    def __post_init__(self) -> None:
        self.limit = self.limit or self.capacity

    def set_capacity(self, capacity: int) -> None:
        """A new share of the server's batch; a limit lowered by its gauges stays lowered."""
        lowered = self.limit < self.capacity
        self.capacity = capacity
        self.limit = min(self.limit, capacity) if lowered else capacity

    def available(self, now: float) -> bool:
        return not self.retired and now >= self.open_until and self.load < self.limit

    @property
    def load(self) -> int:
        """Sequences on the server: ours in flight, and other clients' as its gauges last said."""
        return self.inflight + self.external

    def record_speed(self, samples: int, now: float) -> None:
        elapsed = max(1e-3, now - self._speed_at)
        rate = samples / elapsed
        weight = 0.5 ** (elapsed / SPEED_HALF_LIFE_S)
        self.speed = rate if self.speed == 0 else weight * self.speed + (1 - weight) * rate
        self._speed_at = now


@dataclass(eq=False)
class _Flight:
    id: int
    work: Work
    endpoint: Endpoint
    task: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.monotonic)
    hedge_of: _Flight | None = None  # on a copy: the request it copies
    copy: _Flight | None = None  # on a hedged request: its copy
    hedged: bool = False
    stream: Stream | None = None  # a streamed request: what each choice has made so far
    moved: bool = False
    checking: bool = False  # a move's check of where it would cut is on its way
    split_at: int = -1  # tokens made when that check found a character split at the cut
    # Samples counted in flight for it: those it asked for, less (streamed) the choices finished. Not
    # len(work.samples): a Work sent again (hung endpoint) may be cut while this request still lands.
    held: int = 0


@dataclass(frozen=True)
class DispatchSettings:
    """The daemon's tuning of every job's dispatch. What a job asks for (its policy, hedging, its own
    max_concurrent) is in its JobSpec."""

    max_concurrent: int = 1024  # for a job whose spec leaves it to the daemon (0)
    max_attempts: int = 6
    breaker_failures: int = 5
    breaker_cooldown_s: float = 2.0
    hang_timeout_s: float = 60.0
    request_timeout_s: float | None = None
    metrics_interval_s: float = 1.0  # how often each server's /metrics is read; 0: never


Deliver = Callable[[list[Sample]], Awaitable[None]]


class Dispatcher:
    """Runs a stream of Work over endpoints; `deliver` gets every finished or failed sample, once.

    `deliver` must mark its samples done (so that `is_done` says so) before it first awaits: two hedged
    answers can arrive together, and the second is filtered by `is_done`."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        spec: JobSpec,
        settings: DispatchSettings,
        deliver: Deliver,
        is_done: Callable[[int, int], bool],
        *,
        remaining: Callable[[], int] | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        self._remaining = remaining  # samples the job still needs, fed or not; None: unknown
        self._model, self._sampling = spec.model, spec.sampling
        self._policy, self._hedging = spec.policy, spec.hedge
        self.max_concurrent = spec.max_concurrent or settings.max_concurrent
        self._settings = settings
        self._deliver = deliver
        self._is_done = is_done
        self._queue: collections.deque[Work] = collections.deque()
        self._retry: collections.deque[Work] = collections.deque()
        self._delayed: list[tuple[float, Work]] = []  # retries waiting out their backoff
        self._flights: dict[int, _Flight] = {}
        self._ids = itertools.count()
        self._rr = itertools.count()
        self._wake = asyncio.Event()
        self._input_done = False
        self.inflight = 0
        self.hedges = 0
        self.copied_samples = 0  # samples asked for again by copies
        self.moves = 0  # requests moved, each of their unfinished samples continued elsewhere
        self._movable = self._policy == Policy.LEAST_LOADED and self._hedging and streams.movable(self._sampling)
        self._moved_done: list[Sample] = []  # finished choices of moved requests, for run() to deliver
        self._checks: set[asyncio.Task[None]] = set()
        self._by_rate = False  # every live endpoint's gauges have shown a rate: speeds come from them
        self._asked = 0  # samples added to the queue
        self._stopping = False
        self._fault: Exception | None = None  # an unexpected error in a request's task; run() raises it
        self._http = http.Client()  # the keep-alive connections of the requests and of /metrics

    # --- feeding --------------------------------------------------------------------------------

    def add(self, work: Work) -> None:
        self._queue.append(work)
        self._asked += len(work.samples)
        self._wake.set()

    def close_input(self) -> None:
        """No more work will be added: the tail begins once the queue drains."""
        self._input_done = True
        self._wake.set()

    def drop_backlog(self) -> None:
        """Stopping: send nothing new, retry nothing; the requests in flight may still finish."""
        self._stopping = True
        self._queue.clear()
        self._retry.clear()
        self._delayed.clear()
        self._input_done = True
        self._wake.set()

    def add_endpoint(self, endpoint: Endpoint) -> None:
        """A server joined (an instance became READY): it takes work from the next round."""
        self.endpoints.append(endpoint)
        self._by_rate = False  # until its gauges show a rate too
        self._wake.set()

    def retire_endpoint(self, url: str) -> None:
        """A server left (its instance stopped, failed or restarts): its requests go elsewhere."""
        for endpoint in self.endpoints:
            if endpoint.url == url and not endpoint.retired:
                endpoint.retired = True
                self._requeue(endpoint)
        self.endpoints = [e for e in self.endpoints if not (e.retired and not e.requests)]
        self._by_rate = self._rated()
        self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._queue) + len(self._retry) + len(self._delayed)

    # --- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch until the input is closed and every sample is delivered."""
        poller = asyncio.create_task(self._poll()) if self._settings.metrics_interval_s > 0 else None
        try:
            while not (self._input_done and not self.backlog and not self._flights and not self._moved_done):
                if self._fault is not None:
                    raise self._fault
                if self._moved_done:
                    done, self._moved_done = self._moved_done, []
                    await self._deliver([s for s in done if not self._is_done(s.prompt_index, s.sample_index)])
                self._wake.clear()
                self._check_hangs()
                self._fill()
                soonest = min((at for at, _ in self._delayed), default=time.monotonic() + 0.5)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.01, min(0.5, soonest - time.monotonic())))
        finally:
            if poller is not None:
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)
            for task in [*self._checks, *(f.task for f in self._flights.values() if f.task)]:
                task.cancel()
            await asyncio.gather(*self._checks, *(f.task for f in self._flights.values() if f.task),
                                 return_exceptions=True)  # fmt: skip
            self._http.close()

    async def _poll(self) -> None:
        """Read every server's gauges each interval; a server whose /metrics fails just has none."""
        interval = self._settings.metrics_interval_s
        while True:
            endpoints = [e for e in self.endpoints if not e.retired]
            for endpoint in endpoints:
                endpoint._inflight_at_poll = endpoint.inflight
                endpoint._siblings_at_poll = endpoint.siblings()
            readings = await asyncio.gather(
                *(scrape(self._http, e.url, e.api_key, max(1.0, min(2.0, interval))) for e in endpoints),
                return_exceptions=True,
            )
            now = time.monotonic()
            for endpoint, reading in zip(endpoints, readings, strict=True):
                if isinstance(reading, dict):
                    endpoint.gauges.update(reading, now)
                    self._adapt(endpoint)
                elif isinstance(reading, (http.HttpError, OSError, TimeoutError, ValueError)):
                    endpoint.gauges.fail()
                    endpoint.external = 0
                elif isinstance(reading, BaseException):
                    raise reading
            self._by_rate = self._rated()
            self._wake.set()
            await asyncio.sleep(interval)

    def _adapt(self, endpoint: Endpoint) -> None:
        """Follow the server's gauges: other clients' sequences count as load; a server that keeps
        requests waiting is allowed less, down to what it runs; one with none waiting grows back."""
        g = endpoint.gauges
        ours = endpoint._inflight_at_poll + endpoint._siblings_at_poll
        endpoint.external = max(0, int(g.running + g.waiting) - ours)
        if g.waiting_polls >= WAITING_POLLS:
            runs = max(1, int(g.running))
            endpoint.limit = min(endpoint.limit, max(runs, (endpoint.limit + runs) // 2))
        elif g.waiting == 0 and endpoint.limit < endpoint.capacity:
            endpoint.limit = min(endpoint.capacity, endpoint.limit + max(1, endpoint.limit // 4))

    def _fill(self) -> None:
        if self._stopping:
            return
        now = time.monotonic()
        ready = [w for at, w in self._delayed if at <= now]
        self._delayed = [(at, w) for at, w in self._delayed if at > now]
        self._retry.extend(ready)
        while self.inflight < self.max_concurrent:
            work = self._next_work()
            if work is None:
                break
            endpoint = self._pick(now, len(work.samples))
            if endpoint is None:
                self._retry.appendleft(work)
                break
            work = self._fit(work, endpoint)
            self._launch(work, endpoint)
        if self._tail() and self._policy == "least-loaded" and self._hedging:
            if self._movable:
                self._move(now)
            else:
                self._hedge(now)

    def _next_work(self) -> Work | None:
        source = self._retry or self._queue
        while source:
            work = source.popleft()
            work.samples = [s for s in work.samples if not self._is_done(work.prompt_index, s)]
            if work.samples and self._sampling.seed is not None:
                self._contiguous(work)
            if work.samples:
                if self._tail() and self._policy == "least-loaded" and len(work.samples) > 1:
                    # The tail: spread what is left, one sample per request.
                    for s in work.samples[1:]:
                        self._retry.append(Work(work.prompt_index, work.prompt, [s], work.attempts))
                    work.samples = work.samples[:1]
                return work
            source = self._retry or self._queue
        return None

    def _contiguous(self, work: Work) -> None:
        """Seeded, a request asks for a run of consecutive samples (its choice i has the seed of its
        first plus i): the samples after the first gap wait for a request of their own."""
        run = next((i for i in range(1, len(work.samples)) if work.samples[i] != work.samples[i - 1] + 1), None)
        if run is not None:
            self._retry.appendleft(Work(work.prompt_index, work.prompt, work.samples[run:], work.attempts))
            work.samples = work.samples[:run]

    def _tail(self) -> bool:
        return self._input_done and not self._queue

    def _pick(self, now: float, want: int) -> Endpoint | None:
        if self._policy == "round-robin":
            # The seed's: each request to the next endpoint in turn, whatever it holds already (the
            # server queues what it cannot run); only an endpoint taken out by the breaker is skipped.
            for _ in range(len(self.endpoints)):
                candidate = self.endpoints[next(self._rr) % len(self.endpoints)]
                if not candidate.retired and now >= candidate.open_until:
                    return candidate
            return None
        ready = [e for e in self.endpoints if e.available(now) and e.load < self._share(e)]
        if not ready:
            return None
        if not self._movable:
            ready = self._not_closing(ready)
        known = [self._speed(e) for e in ready if self._speed(e) > 0]
        default_speed = max(known) if known else 1.0
        return min(ready, key=lambda e: (e.load + want) / (self._speed(e) or default_speed))

    def _not_closing(self, ready: list[Endpoint]) -> list[Endpoint]:
        """The end game: an endpoint whose requests take longer than the job has left is sent nothing
        new (what it would get would finish last), unless it is the quickest there is."""
        left = self._time_left_s()
        quickest = min((e.latency_s for e in self.endpoints if not e.retired and e.latency_s > 0), default=0.0)
        return [e for e in ready if e.latency_s <= max(left, quickest)] or ready

    def _time_left_s(self) -> float:
        """Samples left over the summed completion speed; infinite while either is unknown."""
        rate = sum(e.speed for e in self.endpoints if not e.retired)
        if self._remaining is None or rate <= 0 or any(e.speed <= 0 for e in self.endpoints if not e.retired):
            return float("inf")
        return self._remaining() / rate

    def _share(self, endpoint: Endpoint) -> int:
        """least-loaded: a slower endpoint may hold less, in proportion to its measured speed, so that
        little work is left stranded on it at the end; round-robin: its full capacity."""
        fastest = max((self._speed(e) for e in self.endpoints), default=0.0)
        speed = self._speed(endpoint)
        if self._policy == "round-robin" or fastest <= 0 or speed <= 0:
            return endpoint.limit
        return max(1, int(endpoint.limit * speed / fastest))

    def _speed(self, endpoint: Endpoint) -> float:
        """How fast the endpoint works: the peak generation rate its gauges have shown when every
        endpoint's have shown one (the server's own measure, there within a reading or two), else the
        samples it completed per second (which lags: a slow server's first answers come late)."""
        return endpoint.gauges.peak_tokens_per_s if self._by_rate else endpoint.speed

    def _rated(self) -> bool:
        return all(e.gauges.peak_tokens_per_s > 0 for e in self.endpoints if not e.retired)

    def _fit(self, work: Work, endpoint: Endpoint) -> Work:
        """No more samples in one request than the endpoint has room for, nor than the global cap."""
        room = self.max_concurrent - self.inflight
        if self._policy != "round-robin":
            room = min(room, self._share(endpoint) - endpoint.load)
        if len(work.samples) > room >= 1:
            self._retry.appendleft(Work(work.prompt_index, work.prompt, work.samples[room:], work.attempts))
            work = Work(work.prompt_index, work.prompt, work.samples[:room], work.attempts, work.last_error)
        return work

    def _launch(self, work: Work, endpoint: Endpoint, hedge_of: _Flight | None = None) -> None:
        flight = _Flight(next(self._ids), work, endpoint, hedge_of=hedge_of)
        if hedge_of is not None:
            hedge_of.copy = flight
        if self._movable and sum(not e.retired for e in self.endpoints) > 1:
            flight.stream = Stream(len(work.samples), lambda: self._release(flight))
        self._flights[flight.id] = flight
        endpoint.requests[flight.id] = flight
        flight.held = len(work.samples)
        endpoint.inflight += flight.held
        self.inflight += flight.held
        flight.task = asyncio.create_task(self._fly(flight))
        # A task cancelled before it first runs never enters _fly: land it here too (landing is idempotent).
        flight.task.add_done_callback(lambda _: self._landed(flight))

    def _hedge(self, now: float) -> None:
        """In the tail, copy requests from endpoints where they will take long onto ones where they
        will not: with gauges, where a sequence's decode step is at most half as long; without, where
        the requests in flight drain in less than half the time."""
        live = [e for e in self.endpoints if not e.retired]
        timed = all(e.gauges.ok and e.gauges.step_s > 0 for e in live)
        cost = self._step_after if timed else self._drain_s
        flights = sorted(
            (f for f in self._flights.values() if not f.hedged and f.hedge_of is None),
            key=lambda f: (-cost(f.endpoint, 0), f.started),
        )
        for flight in flights:
            want = len(flight.work.samples)
            if self.inflight + want > self.max_concurrent:
                return
            if not self._may_copy(want):
                continue  # a smaller request may still fit the budget
            room = [e for e in live if e is not flight.endpoint and e.available(now)]
            if not room:
                return
            target = min(room, key=lambda e: cost(e, want))
            if cost(target, want) * 2 > cost(flight.endpoint, 0):
                return  # the rest are on endpoints where they go about as fast: no gain in copying
            flight.hedged = True
            self.hedges += 1
            self.copied_samples += want
            copy = Work(flight.work.prompt_index, flight.work.prompt, list(flight.work.samples))
            self._launch(copy, target, hedge_of=flight)

    def _move(self, now: float) -> None:
        """In the tail, move running samples from endpoints to ones at least MOVE_GAIN times faster (by
        their peak generation rate) where a token takes at most 1/MOVE_GAIN of the time it takes where
        they are (`_token_s`): the slowest endpoints' first, each one's oldest requests first, each to
        the endpoint with room where its tokens would be quickest. Every endpoint needs its gauges. A
        move waits for a check that its samples do not end inside a character (`_check_and_move`)."""
        live = [e for e in self.endpoints if not e.retired]
        if len(live) < 2 or not self._by_rate or not all(e.gauges.ok for e in live):
            return
        for source in sorted(live, key=lambda e: e.gauges.peak_tokens_per_s):
            faster = [e for e in live if e.gauges.peak_tokens_per_s >= source.gauges.peak_tokens_per_s * MOVE_GAIN]
            for flight in list(source.requests.values()):  # in the order they were sent
                stream = flight.stream
                if stream is None or flight.moved or flight.checking or not stream.started:
                    continue
                left = len(stream.unfinished())
                if left == 0 or _made(stream) == flight.split_at:
                    continue  # finished, or a check found it ends inside a character: its next chunk
                room = [e for e in faster if e.available(now) and self._room(e) >= left]
                if not room:
                    if any(e.available(now) and self._room(e) > 0 for e in faster):
                        continue  # too many samples for the room there is: a smaller request may fit
                    break
                target = min(room, key=lambda e: _token_s(e, left))
                if _token_s(target, left) * MOVE_GAIN > _token_s(source, 0):
                    break  # nowhere much quicker for this endpoint's samples
                self._check_and_move(flight, target, left)

    def _room(self, endpoint: Endpoint) -> int:
        return min(self._share(endpoint), endpoint.limit) - endpoint.load - endpoint.reserved

    def _check_and_move(self, flight: _Flight, target: Endpoint, left: int) -> None:
        """Ask `target`'s /detokenize whether each unfinished sample of `flight` ends with a whole
        character (requests.ends_whole), and move the flight if so and nothing changed meanwhile; if
        not, it waits for its next chunk."""
        assert flight.stream is not None
        stream, made = flight.stream, _made(flight.stream)
        flight.checking = True
        target.reserved += left

        async def check() -> None:
            try:
                tails = [c.token_ids for c in stream.choices if c.finish_reason is None]
                checks = [ends_whole(self._http, target.url, self._model, t, target.api_key) for t in tails]
                whole = all(await asyncio.gather(*checks))
            except Exception as exc:  # mvllmd's own fault: run() raises it
                self._fault = self._fault or exc
                return
            finally:
                flight.checking = False
                target.reserved -= left
                self._wake.set()
            unchanged = flight.id in self._flights and _made(stream) == made
            if not whole:
                flight.split_at = made
            elif unchanged and not self._stopping and target.available(time.monotonic()):
                self._move_flight(flight, target)

        task = asyncio.create_task(check())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def _move_flight(self, flight: _Flight, target: Endpoint) -> None:
        """Cancel a streamed request (vLLM aborts it); keep its finished choices, and continue each
        unfinished one on `target` from what it made."""
        stream, work = flight.stream, flight.work
        assert stream is not None
        flight.moved = True
        self.moves += 1
        if flight.task is not None:
            flight.task.cancel()
        self._land(flight)
        started = work.prefix.started if work.prefix else flight.started
        unfinished = stream.unfinished()
        for i, sample_index in enumerate(work.samples):
            if i in unfinished:
                prefix = stream.prefix(i, started, work.prefix) or work.prefix
                self._launch(Work(work.prompt_index, work.prompt, [sample_index], work.attempts, prefix=prefix), target)
                continue
            latency = time.monotonic() - flight.started
            done = stream.sample(i, flight.endpoint.url, self._sampling, work.prompt_index, sample_index, latency)
            flight.endpoint.completed += 1
            flight.endpoint.tokens += done.completion_tokens or 0
            self._moved_done.append(work.prefix.join(done) if work.prefix else done)
        self._wake.set()

    def _may_copy(self, samples: int) -> bool:
        """Seeded, a copy asks for the same samples: always. Unseeded, a copy is a new draw and the
        first answer wins, which favours short samples: at most HEDGE_BUDGET of the job's samples may
        come from such a race (the balance benchmark's tail uses about 1.8%; a small job, all in flight
        at once, would otherwise copy half of itself)."""
        if self._sampling.seed is not None:
            return True
        return self.copied_samples + samples <= HEDGE_BUDGET * self._asked

    def _step_after(self, endpoint: Endpoint, more: int) -> float:
        """The server's decode step (s per token of a sequence) with `more` sequences than at its last
        reading: the step grows in proportion to the batch, never below the fastest seen (an idle
        server's step is its fastest)."""
        g = endpoint.gauges
        step = g.step_s if g.running >= 1 else g.min_step_s
        running = max(1.0, g.running)
        batch = max(1.0, g.running + endpoint.inflight - endpoint._inflight_at_poll + more)
        return max(g.min_step_s, step * batch / running)

    def _drain_s(self, endpoint: Endpoint, more: int) -> float:
        """How long the endpoint's requests in flight (and `more`) take at its completion speed."""
        default = max((e.speed for e in self.endpoints), default=0.0) or 1.0
        return (endpoint.inflight + more) / (endpoint.speed or default)

    # --- one request ----------------------------------------------------------------------------

    async def _fly(self, flight: _Flight) -> None:
        try:
            await self._request(flight)
        except Exception as exc:  # mvllmd's own fault (a bug, a full disk): run() raises it, the job fails
            self._land(flight)
            self._fault = self._fault or exc
        finally:
            self._wake.set()

    async def _request(self, flight: _Flight) -> None:
        work, endpoint = flight.work, flight.endpoint
        try:
            if work.prompt is None:
                raise RequestFailed("the prompt is missing or not a string or a list of messages", False)
            samples = await send(self._http, endpoint.url, self._model, self._sampling, work.prompt,
                                 work.prompt_index, work.samples, self._settings.request_timeout_s,
                                 endpoint.api_key, stream=flight.stream, prefix=work.prefix)  # fmt: skip
        except asyncio.CancelledError:
            self._land(flight)
            raise
        except RequestFailed as exc:
            self._land(flight)
            await self._failed(flight, exc)
        else:
            self._land(flight)
            self._succeeded(flight, samples)
            await self._deliver([s for s in samples if not self._is_done(s.prompt_index, s.sample_index)])
            self._cancel_twin(flight)

    def _landed(self, flight: _Flight) -> None:
        self._land(flight)
        self._wake.set()

    def _release(self, flight: _Flight) -> None:
        """A streamed choice finished: the server runs one sequence fewer of ours, so one more may go."""
        if flight.id in self._flights and flight.held > 0:
            flight.held -= 1
            flight.endpoint.inflight -= 1
            self.inflight -= 1
            self._wake.set()

    def _land(self, flight: _Flight) -> None:
        if self._flights.pop(flight.id, None) is None:
            return
        flight.endpoint.requests.pop(flight.id, None)
        flight.endpoint.inflight -= flight.held
        self.inflight -= flight.held

    def _succeeded(self, flight: _Flight, samples: list[Sample]) -> None:
        endpoint, now = flight.endpoint, time.monotonic()
        endpoint.failures_in_a_row, endpoint.cooldown_s = 0, 0.0
        endpoint.completed += len(samples)
        endpoint.tokens += sum(s.completion_tokens or 0 for s in samples)
        endpoint.last_completion = now
        endpoint.record_speed(len(samples), now)
        took = now - flight.started
        endpoint.latency_s = took if endpoint.latency_s == 0 else 0.9 * endpoint.latency_s + 0.1 * took

    def _cancel_twin(self, flight: _Flight) -> None:
        twins = [f for f in (flight.copy, flight.hedge_of) if f is not None and f.id in self._flights]
        for twin in twins:
            if twin.task is not None:
                twin.task.cancel()

    async def _failed(self, flight: _Flight, exc: RequestFailed) -> None:
        work = flight.work
        if exc.retryable:
            self._trip(flight.endpoint)
        if any(f is not None and f.id in self._flights for f in (flight.copy, flight.hedge_of)):
            return  # its twin still runs and will answer for these samples
        if self._stopping:
            return  # not retried now; a resumed job asks again
        work.attempts += 1
        work.last_error = str(exc)
        if exc.retryable and work.attempts < self._settings.max_attempts:
            self._delayed.append((time.monotonic() + min(10.0, 0.1 * 2**work.attempts), work))
            return
        log.warning("prompt %d: giving up after %d attempts: %s", work.prompt_index, work.attempts, exc)
        await self._deliver([_failed_sample(work, s, str(exc), flight.endpoint.url) for s in work.samples])

    def _trip(self, endpoint: Endpoint) -> None:
        endpoint.failures_in_a_row += 1
        if endpoint.failures_in_a_row >= self._settings.breaker_failures:
            endpoint.cooldown_s = min(60.0, (endpoint.cooldown_s or self._settings.breaker_cooldown_s / 2) * 2)
            endpoint.open_until = time.monotonic() + endpoint.cooldown_s
            endpoint.failures_in_a_row = self._settings.breaker_failures - 1  # half-open: one more failure re-opens
            log.warning("endpoint %s taken out for %.0fs after repeated failures", endpoint.url, endpoint.cooldown_s)

    def _check_hangs(self) -> None:
        """An endpoint is hung when it has had requests in flight for `hang_timeout_s` and completed
        none in that time: counted from its last completion or from its oldest request in flight,
        whichever is later (an endpoint back from a cooldown, or idle for a while, is judged on the
        requests it has now, not on how long ago it last answered)."""
        now = time.monotonic()
        for endpoint in self.endpoints:
            if not endpoint.requests or now - endpoint.last_completion <= self._settings.hang_timeout_s:
                continue  # answered lately: not hung, without looking at each request (this runs per wake)
            since = max(endpoint.last_completion, min(f.started for f in endpoint.requests.values()))
            if now - since > self._settings.hang_timeout_s:
                log.warning("endpoint %s completed nothing for %.0fs with requests in flight: treating it as hung",
                            endpoint.url, now - since)  # fmt: skip
                endpoint.cooldown_s = max(endpoint.cooldown_s * 2, self._settings.hang_timeout_s)
                endpoint.open_until = now + endpoint.cooldown_s
                endpoint.last_completion = now
                self._requeue(endpoint)

    def _requeue(self, endpoint: Endpoint) -> None:
        """Cancel the endpoint's requests and send their samples elsewhere."""
        for flight in list(endpoint.requests.values()):
            if flight.task is not None:
                flight.task.cancel()
            self._land(flight)  # now, not when its task ends: nothing may move or copy it meanwhile
            if flight.hedge_of is None:
                self._retry.appendleft(flight.work)


def _made(stream: Stream) -> int:
    """Tokens the unfinished choices of a streamed request have made."""
    return sum(len(c.token_ids) for c in stream.choices if c.finish_reason is None)


def _token_s(endpoint: Endpoint, more: int) -> float:
    """A running sequence's time per token on the endpoint with `more` sequences than it has (moves on
    their way there included): its batch over its peak generation rate, the batch counted as at least
    MOVE_MIN_BATCH (see there)."""
    return max(endpoint.load + endpoint.reserved + more, MOVE_MIN_BATCH) / endpoint.gauges.peak_tokens_per_s


def _failed_sample(work: Work, sample_index: int, error: str, endpoint: str) -> Sample:
    return Sample(work.prompt_index, sample_index, None, None, None, None, endpoint, None, None, error)
