"""The dispatcher's loop: take work, pick a lane, send, deliver; every sample once.

Work is a queue of `Work` items: one prompt and the sample indexes it still needs. At most
`max_concurrent` of the job's samples are in flight, and on each server at most the job's share of
its limit (least-loaded; round robin lets the server queue). The policy picks each request's lane
(policies/); the tail, for a least-loaded job, splits the last prompts' samples and moves or copies
what runs slowly (tail.py); the servers' shared state (endpoint.py) is read by every job that uses
them, and the job's own requests are counted in flights.py.

Failures: connection errors, timeouts, 429 and 5xx are retried elsewhere with backoff, up to
`max_attempts`; then, like a permanent failure (a 4xx), the samples are recorded with their `error`.
A retryable failure also tells the server's breaker. A server that hangs (endpoints.py watches) has
its requests cancelled and sent elsewhere.

What waits to be sent is the job's backlog (backlog.py): seeded work is cut at the first gap in its
sample indexes, the tail's split into single samples, and the feeder held back while it is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

from mvllm.jobs import JobSpec, Sample
from mvllmd.dispatch import policies
from mvllmd.dispatch.backlog import Backlog
from mvllmd.dispatch.endpoint import Endpoint
from mvllmd.dispatch.endpoints import Endpoints, Listener
from mvllmd.dispatch.flights import Flight, Flights, Lane, Work
from mvllmd.dispatch.policies.least_loaded import LeastLoaded
from mvllmd.dispatch.tail import Hooks, Tail
from mvllmd.transport import http
from mvllmd.transport.batches import Batches
from mvllmd.transport.requests import RequestFailed
from mvllmd.transport.streams import Stream

log = logging.getLogger(__name__)

REINDEX_S = 0.5  # the policy re-keys every lane at least this often (speeds drift between readings)
IDLE_WAKE_S = 0.5  # the loop looks around at least this often when nothing wakes it

Deliver = Callable[[list[Sample]], Awaitable[None]]


class Dispatcher:
    """Runs a stream of Work over the lanes it is given, as `spec` says (its model, sampling, policy,
    max_concurrent, which must be set, and hedge); `deliver` gets every finished or failed sample,
    once. `deliver` must mark its samples done (so that `is_done` says so) before it first awaits:
    two hedged answers can arrive together, and the second is filtered by `is_done`."""

    def __init__(self, spec: JobSpec, endpoints: Endpoints, deliver: Deliver, is_done: Callable[[int, int], bool],
                 *, remaining: Callable[[], int] | None = None) -> None:  # fmt: skip
        if spec.max_concurrent < 1:
            raise ValueError("the dispatcher needs the job's max_concurrent (the daemon's default resolved)")
        self._spec = spec
        self._sampling = spec.sampling
        self._tuning = endpoints.tuning
        self._endpoints = endpoints
        self._deliver = deliver
        self._is_done = is_done
        self._remaining = remaining  # samples the job still needs, fed or not; None: unknown
        self._policy = policies.make(spec.policy)
        self._lanes: dict[str, Lane] = {}
        self._live = 0  # lanes whose server has not left
        self._flights = Flights()
        self._backlog = Backlog(is_done, seeded=spec.sampling.seed is not None)
        self._wake = asyncio.Event()
        self._stopping = False
        self._fault: Exception | None = None  # an unexpected error in a request's task; run() raises it
        self._reindexed = 0.0
        self._http = http.Client()  # the requests' keep-alive connections
        self._batches = Batches(self._http, spec.model, spec.sampling)  # short requests to a server travel as one
        self._listener = Listener(self._read, self._lost)
        self._tail: Tail | None = None
        if isinstance(self._policy, LeastLoaded):  # the end game even without hedging; moves and copies with it
            hooks = Hooks(self.lanes, self._launch, self._land, self._set_fault, self._wake.set,
                          lambda: self._stopping, lambda: spec.max_concurrent - self._flights.inflight)  # fmt: skip
            self._tail = Tail(self._flights, self._policy, spec, self._http, hooks)

    # --- what the job sees -----------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._flights.inflight

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    @property
    def hedges(self) -> int:
        return self._tail.hedges if self._tail else 0

    @property
    def copied_samples(self) -> int:
        return self._tail.copied_samples if self._tail else 0

    @property
    def moves(self) -> int:
        return self._tail.moves if self._tail else 0

    def lanes(self) -> list[Lane]:
        return list(self._lanes.values())

    # --- feeding ---------------------------------------------------------------------------------

    def add(self, work: Work) -> None:
        self._backlog.add(work)
        self._wake.set()

    async def room(self, most: int) -> None:
        """Wait until at most `most` items wait to be sent (or the job stops): memory stays bounded."""
        await self._backlog.room(most)

    @property
    def accepting(self) -> bool:
        """Whether work added now may still be sent (not once the job stops or the loop has ended)."""
        return not self._backlog.closed

    def fail(self, exc: Exception) -> None:
        """End the job with `exc` (its owner's fault, such as a write that failed): run() raises it."""
        self._set_fault(exc)

    def close_input(self) -> None:
        """No more work will be added: the tail begins once the queue drains."""
        self._backlog.input_done = True
        self._wake.set()

    def drop_backlog(self) -> None:
        """Stopping: send nothing new, retry nothing; the requests in flight may still finish."""
        self._stopping = True
        self._backlog.close(drop=True)
        self._wake.set()

    def join(self, url: str, capacity: int, api_key: str = "") -> None:
        """A server joined (an instance became READY): it takes work from the next round."""
        earlier = self._lanes.get(url)
        if earlier is not None and not earlier.left:
            return
        lane = Lane(self._endpoints.join(url, capacity, api_key), weight_version=self._spec.weight_version)
        if earlier is not None:  # back (its instance restarted): the job's counts there go on
            lane.completed, lane.tokens = earlier.completed, earlier.tokens
        self._lanes[url] = lane
        self._live += 1
        self._policy.add(lane)
        self._wake.set()

    def leave(self, url: str) -> None:
        """A server left (its instance stopped, failed or restarts): its requests go elsewhere."""
        lane = self._lanes.get(url)
        if lane is None or lane.left:
            return
        lane.left = True
        self._live -= 1
        self._policy.remove(lane)
        self._endpoints.leave(lane.endpoint)
        self._requeue(lane)
        if not lane.completed:
            del self._lanes[url]
        self._wake.set()

    # --- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch until the input is closed and every sample is delivered."""
        self._endpoints.listen(self._listener)
        try:
            while not self._finished():
                if self._fault is not None:
                    raise self._fault
                await self._deliver_moved()
                self._wake.clear()
                self._fill()
                with contextlib.suppress(TimeoutError):  # (asyncio.timeout: 3.11's wait_for can swallow a cancel)
                    async with asyncio.timeout(self._until_due()):
                        await self._wake.wait()
        finally:
            self._backlog.close(drop=False)
            self._endpoints.unlisten(self._listener)
            await self._cancel_all()
            self.close()

    def close(self) -> None:
        """Leave every server (idempotent): run() does it when it ends; whoever joined servers and then
        does not run the dispatcher must."""
        for lane in self._lanes.values():
            if not lane.left:
                lane.left = True
                self._endpoints.leave(lane.endpoint)
        self._batches.close()
        self._http.close()

    def _until_due(self) -> float:
        """How long the loop may sleep: until a retry's backoff or a put-off look of the tail is due."""
        due = min(self._backlog.next_due, self._tail.next_look if self._tail else math.inf)
        return max(0.01, min(IDLE_WAKE_S, due - time.monotonic()))

    def _finished(self) -> bool:
        moved = self._tail.finished if self._tail else ()
        return self._backlog.input_done and not self._backlog and not self._flights and not moved

    async def _deliver_moved(self) -> None:
        if self._tail is not None and self._tail.finished:
            done, self._tail.finished = self._tail.finished, []
            await self._deliver([s for s in done if not self._is_done(s.prompt_index, s.sample_index)])

    async def _cancel_all(self) -> None:
        tasks = [f.task for f in self._flights.all() if f.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._tail is not None:
            await self._tail.close()

    def _fill(self) -> None:
        if self._stopping:
            return
        now = time.monotonic()
        if now - self._reindexed >= REINDEX_S:
            self._reindexed = now
            self._policy.reindex()
        avoid = self._tail.closing(now, self._remaining() if self._remaining else None) if self._tail else ()
        while self._flights.inflight < self._spec.max_concurrent:
            work = self._backlog.take(now, split_tail=self._policy.balances)  # the tail: spread, one by one
            if work is None:
                break
            lane = self._policy.pick(len(work.samples), now, avoid)
            if lane is None:
                self._backlog.again(work)
                break
            room = min(self._spec.max_concurrent - self._flights.inflight, self._policy.room(lane))
            self._launch(self._backlog.cut(work, room), lane, None)
        self._backlog.taken()
        if self._tail is not None and self._spec.hedge and self._backlog.in_tail:
            self._tail.look(now, self._backlog.asked)

    def _launch(self, work: Work, lane: Lane, hedge_of: Flight | None) -> Flight:
        weights = lane.endpoint.weights
        movable = self._tail is not None and self._live > 1 and self._tail.may_move_from(lane)
        flight = self._flights.open(work, lane, hedge_of, streamed=bool(weights.version) or movable)
        if weights.version:  # streamed, so that each token is labelled with the version that made it
            flight.stream = Stream(len(work.samples), lambda: self._release(flight), lambda: weights.version)
        elif movable:
            flight.stream = Stream(len(work.samples), lambda: self._release(flight))
        self._policy.changed(lane)
        flight.task = asyncio.create_task(self._fly(flight))
        # A task cancelled before it first runs never enters _fly: land it here too (landing is idempotent).
        flight.task.add_done_callback(lambda _: self._landed(flight))
        return flight

    # --- one request -----------------------------------------------------------------------------

    async def _fly(self, flight: Flight) -> None:
        try:
            await self._request(flight)
        except Exception as exc:  # mvllmd's own fault (a bug, a full disk): run() raises it, the job fails
            self._land(flight)
            self._set_fault(exc)
        finally:
            self._wake.set()

    async def _request(self, flight: Flight) -> None:
        work, endpoint = flight.work, flight.endpoint
        try:
            if work.prompt is None:
                raise RequestFailed("the prompt is missing or not a string or a list of messages", False)
            samples = await self._batches.send(endpoint.url, work.prompt, work.prompt_index, work.samples,
                                               self._tuning.request_timeout_s, endpoint.api_key,
                                               stream=flight.stream, prefix=work.prefix)  # fmt: skip
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
            for twin in flight.twins():
                if twin in self._flights and twin.task is not None:
                    twin.task.cancel()

    def _succeeded(self, flight: Flight, samples: list[Sample]) -> None:
        now = time.monotonic()
        tokens = sum(s.completion_tokens or 0 for s in samples)
        flight.lane.completed += len(samples)
        flight.lane.tokens += tokens
        flight.endpoint.succeeded(len(samples), now - flight.started, now)
        self._policy.changed(flight.lane)

    async def _failed(self, flight: Flight, exc: RequestFailed) -> None:
        work = flight.work
        if exc.retryable and exc.counted:
            flight.endpoint.failed(flight.started, time.monotonic())
        if any(twin in self._flights for twin in flight.twins()):
            return  # its twin still runs and will answer for these samples
        if self._stopping:
            return  # not retried now; a resumed job asks again
        work.attempts += 1
        work.last_error = str(exc)
        if exc.retryable and work.attempts < self._tuning.max_attempts:
            self._backlog.later(work, time.monotonic() + min(10.0, 0.1 * 2**work.attempts))
            return
        log.warning("prompt %d: giving up after %d attempts: %s", work.prompt_index, work.attempts, exc)
        await self._deliver([_failed_sample(work, s, str(exc), flight.endpoint.url) for s in work.samples])

    def _landed(self, flight: Flight) -> None:
        self._land(flight)
        self._wake.set()

    def _land(self, flight: Flight) -> None:
        if self._flights.land(flight):
            self._policy.changed(flight.lane)

    def _release(self, flight: Flight) -> None:
        """A streamed choice finished: the server runs one sequence fewer of ours, so one more may go."""
        if self._flights.release(flight):
            self._policy.changed(flight.lane)
            self._wake.set()

    def _set_fault(self, exc: Exception) -> None:
        self._fault = self._fault or exc
        self._wake.set()

    # --- what the servers' watch says ------------------------------------------------------------

    def _read(self) -> None:
        """A round of /metrics readings is in: speeds, limits and other clients' loads moved."""
        self._reindexed = time.monotonic()
        self._policy.reindex()
        self._wake.set()

    def _lost(self, endpoint: Endpoint) -> None:
        for lane in self._lanes.values():
            if lane.endpoint is endpoint:
                self._requeue(lane)
        self._wake.set()

    def _requeue(self, lane: Lane) -> None:
        """Cancel the lane's requests and send their samples elsewhere."""
        for flight in list(lane.requests.values()):
            if flight.task is not None:
                flight.task.cancel()
            self._land(flight)  # now, not when its task ends: nothing may move or copy it meanwhile
            if flight.hedge_of is None:
                self._backlog.again(flight.work)


def _failed_sample(work: Work, sample_index: int, error: str, endpoint: str) -> Sample:
    return Sample(work.prompt_index, sample_index, None, None, None, None, endpoint, None, None, error)
