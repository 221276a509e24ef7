"""The tail of a least-loaded job: what is left must not be stranded on slow servers.

Once the input is closed and the queue is dry, what is left of a prompt is split into single samples
to spread across servers (the loop does that), and every TAIL_EVERY_S the tail looks at what runs:

- Moves, for a job whose samples can be continued elsewhere (streams.movable: unseeded, no stop
  strings, a max_tokens). Its requests stream (with two servers or more, unless the servers' rates
  are known and none is MOVE_GAIN times faster than the one a request goes to), so what each sample has
  made is known, and a choice that finishes frees its place at once. Running samples move from
  servers to ones at least MOVE_GAIN times faster (peak generation rate) where a token would take at
  most 1/MOVE_GAIN of the time (`_token_s`), the slowest servers' first, each one's oldest requests
  first, each to the server with room where its tokens would be quickest; once the target says they
  end with a whole character (`_check_and_move`): the request is cancelled, its finished choices
  kept, and each unfinished one continues on the faster server from the tokens it had made when
  checked, as the same sample (streams.py). Tokens a sample made during the check are made again (a
  check that had to see the stream unchanged was beaten by every chunk on a loaded machine).
- Copies (a hedge), for other jobs: requests are copied from where they go slowly onto servers where
  they will go at least twice as fast: by the servers' decode step (seconds per token of a running
  sequence, from the gauges, grown in proportion to the batch the copies add) when every server has
  gauges, else by how long each server's requests in flight take to drain. The first answer wins,
  the other is cancelled, and each sample is written once. A seeded copy asks for the same samples as
  its original; an unseeded one is a new draw, so keeping the first answer favours shorter samples:
  an unseeded job copies at most HEDGE_BUDGET (2%) of its samples.
- The end game (`closing`), for jobs that do not move (--no-hedge included): a server whose requests take longer
  (smoothed latency) than the job has left (samples left over the summed completion speed) is sent
  nothing new, unless it is the quickest there is.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from mvllm.jobs import JobSpec, Sample
from mvllmd.dispatch.flights import Flight, Flights, Lane, Work
from mvllmd.dispatch.policies.least_loaded import LeastLoaded
from mvllmd.transport import http, streams
from mvllmd.transport.requests import ends_whole
from mvllmd.transport.streams import Prefix, Stream

HEDGE_BUDGET = 0.02  # unseeded: at most this share of a job's samples is asked for again by copies
MOVE_GAIN = 1.3  # a sample moves where a token takes at most 1/MOVE_GAIN of the time (balance_model.py)
# A token's time is taken as the batch over the server's rate, the batch counted as at least this: a
# small batch's step is bound by reading the weights, not by the batch. Lower than where that bound
# ends (about 200 sequences for an 8B model on an H100, profiles.toml), which moved too eagerly in
# benchmarks/balance_model.py (1.20 x the bound at 256, 1.18 at 128, 1.17 at 64).
MOVE_MIN_BATCH = 64
TAIL_EVERY_S = 0.02  # how often the tail looks at what runs (a look costs one pass over the flights)
CLOSING_EVERY_S = 0.1  # how often the end game's set of servers to avoid is worked out again


@dataclass(frozen=True)
class Hooks:
    """What the tail asks of the loop that owns it."""

    lanes: Callable[[], list[Lane]]  # the lanes in use
    launch: Callable[[Work, Lane, Flight | None], Flight]  # send work (a copy of a flight, or not)
    land: Callable[[Flight], None]  # a flight is over: its samples leave the counts
    fault: Callable[[Exception], None]  # mvllmd's own error in a check: the loop raises it
    wake: Callable[[], None]
    stopping: Callable[[], bool]
    room: Callable[[], int]  # samples the job may still put in flight (its max_concurrent less what flies)


class Tail:
    def __init__(self, flights: Flights, policy: LeastLoaded, spec: JobSpec, client: http.Client,
                 hooks: Hooks) -> None:  # fmt: skip
        self._flights = flights
        self._policy = policy
        self._spec = spec
        self._sampling = spec.sampling
        self._http = client
        self._hooks = hooks
        self.movable = spec.hedge and streams.movable(spec.sampling)  # --no-hedge: no moves, no streams
        self.hedges = 0
        self.copied_samples = 0  # samples asked for again by copies
        self.moves = 0  # requests moved, each of their unfinished samples continued elsewhere
        self.finished: list[Sample] = []  # finished choices of moved requests, for the loop to deliver
        self._checks: set[asyncio.Task[None]] = set()
        self._looked_at = 0.0
        self.next_look = math.inf  # when a look that was put off is due: the loop wakes for it
        self._avoid: set[Lane] = set()
        self._avoid_at = -CLOSING_EVERY_S

    def look(self, now: float, asked: int) -> None:
        """Move or copy what runs slowly, at most every TAIL_EVERY_S (a look put off is due at `next_look`)."""
        if now - self._looked_at < TAIL_EVERY_S:
            self.next_look = self._looked_at + TAIL_EVERY_S
            return
        self._looked_at, self.next_look = now, math.inf
        if self.movable:
            self._move(now)
        else:
            self._hedge(now, asked)

    def may_move_from(self, lane: Lane) -> bool:
        """Whether a request sent to `lane` now might move later, so that it must stream: unless the
        servers' rates are known and none is MOVE_GAIN times faster than this one's (streaming costs
        CPU per chunk on both sides, for nothing where the servers are alike)."""
        return self.movable and (not self._policy.by_rate or self._policy.fastest >= _rate(lane) * MOVE_GAIN)

    def closing(self, now: float, remaining: int | None) -> set[Lane]:
        """The end game's servers to send nothing new to (none for a job that moves its samples)."""
        if self.movable or remaining is None:
            return set()
        if now - self._avoid_at >= CLOSING_EVERY_S:
            self._avoid_at = now
            self._avoid = self._closing(remaining)
        return self._avoid

    async def close(self) -> None:
        for task in self._checks:
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)

    # --- the end game ----------------------------------------------------------------------------

    def _closing(self, remaining: int) -> set[Lane]:
        live = [lane for lane in self._hooks.lanes() if not lane.left]
        speeds = [lane.endpoint.speed for lane in live]
        if not speeds or min(speeds) <= 0:
            return set()  # the time left is unknown
        left = remaining / sum(speeds)
        quickest = min((lane.endpoint.latency_s for lane in live if lane.endpoint.latency_s > 0), default=0.0)
        return {lane for lane in live if lane.endpoint.latency_s > max(left, quickest)}

    # --- copies ----------------------------------------------------------------------------------

    def _hedge(self, now: float, asked: int) -> None:
        live = [lane for lane in self._hooks.lanes() if not lane.left]
        timed = all(lane.endpoint.gauges.ok and lane.endpoint.gauges.step_s > 0 for lane in live)
        cost = _step_after if timed else self._drain_s
        flights = sorted(
            (f for f in self._flights.all() if not f.hedged and f.hedge_of is None),
            key=lambda f: (-cost(f.lane, 0), f.started),
        )
        for flight in flights:
            want = len(flight.work.samples)
            if want > self._hooks.room():
                return
            if not self._may_copy(want, asked):
                continue  # a smaller request may still fit the budget
            room = [lane for lane in live if lane is not flight.lane and lane.available(now)]
            if not room:
                return
            target = min(room, key=lambda lane: cost(lane, want))
            if cost(target, want) * 2 > cost(flight.lane, 0):
                return  # the rest are on servers where they go about as fast: no gain in copying
            flight.hedged = True
            self.hedges += 1
            self.copied_samples += want
            copy = Work(flight.work.prompt_index, flight.work.prompt, list(flight.work.samples))
            self._hooks.launch(copy, target, flight)

    def _may_copy(self, samples: int, asked: int) -> bool:
        """Seeded, a copy asks for the same samples: always. Unseeded, a copy is a new draw and the
        first answer wins, which favours short samples: at most HEDGE_BUDGET of the job's samples may
        come from such a race (the balance benchmark's tail uses about 1.8%; a small job, all in flight
        at once, would otherwise copy half of itself)."""
        if self._sampling.seed is not None:
            return True
        return self.copied_samples + samples <= HEDGE_BUDGET * asked

    def _drain_s(self, lane: Lane, more: int) -> float:
        """How long the lane's requests in flight (and `more`) take at its server's completion speed."""
        default = max((other.endpoint.speed for other in self._hooks.lanes()), default=0.0) or 1.0
        return (lane.inflight + more) / (lane.endpoint.speed or default)

    # --- moves -----------------------------------------------------------------------------------

    def _move(self, now: float) -> None:
        """Move running samples from servers to ones at least MOVE_GAIN times faster where a token
        takes at most 1/MOVE_GAIN of the time it takes where they are. Every server needs its gauges."""
        live = [lane for lane in self._hooks.lanes() if not lane.left]
        if len(live) < 2 or not self._policy.by_rate or not all(lane.endpoint.gauges.ok for lane in live):
            return
        for source in sorted(live, key=_rate):
            faster = [lane for lane in live if _rate(lane) >= _rate(source) * MOVE_GAIN]
            for flight in list(source.requests.values()):  # in the order they were sent
                stream = flight.stream
                if stream is None or flight.moved or flight.checking or not stream.started:
                    continue
                left = len(stream.unfinished())
                if left == 0 or _made(stream) == flight.split_at:
                    continue  # finished, or a check found it ends inside a character: its next chunk
                room = [lane for lane in faster if lane.available(now) and self._room(lane) >= left]
                if not room:
                    if any(lane.available(now) and self._room(lane) > 0 for lane in faster):
                        continue  # too many samples for the room there is: a smaller request may fit
                    break
                target = min(room, key=lambda lane: _token_s(lane, left))
                if _token_s(target, left) * MOVE_GAIN > _token_s(source, 0):
                    break  # nowhere much quicker for this server's samples
                self._check_and_move(flight, target, left)

    def _room(self, lane: Lane) -> int:
        return min(self._policy.share(lane), lane.limit) - lane.load - lane.reserved

    def _check_and_move(self, flight: Flight, target: Lane, left: int) -> None:
        """Ask the target's /detokenize whether each unfinished sample of `flight` ends with a whole
        character (requests.ends_whole), and move the flight if so, each sample from what it had made
        when checked; if not, it waits for its next chunk."""
        assert flight.stream is not None
        stream, made = flight.stream, _made(flight.stream)
        # What each unfinished sample has made now: if the check says it ends whole, the sample goes on
        # from here, even where the stream went further during the check (the tokens it made meanwhile
        # are dropped and made again there: unseeded, the continuation is a draw from the same point).
        checked = {i: self._prefix(flight, i) for i in stream.unfinished()}
        tails = [prefix.token_ids if prefix else () for prefix in checked.values()]
        flight.checking = True
        target.reserved += left
        endpoint = target.endpoint

        async def check() -> None:
            try:
                checks = [ends_whole(self._http, endpoint.url, self._spec.model, t, endpoint.api_key)
                          for t in tails]  # fmt: skip
                whole = all(await asyncio.gather(*checks))
            except Exception as exc:  # mvllmd's own fault: the loop raises it
                self._hooks.fault(exc)
                return
            finally:
                flight.checking = False
                target.reserved -= left
                self._hooks.wake()
            if not whole:
                flight.split_at = made
            elif flight in self._flights and not self._hooks.stopping() and target.available(time.monotonic()):
                self._move_flight(flight, target, checked)

        task = asyncio.create_task(check())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def _prefix(self, flight: Flight, i: int) -> Prefix | None:
        """What sample `i` of a streamed flight has made so far, after what it was sent with."""
        assert flight.stream is not None
        work = flight.work
        started = work.prefix.started if work.prefix else flight.started
        return flight.stream.prefix(i, started, work.prefix) or work.prefix

    def _move_flight(self, flight: Flight, target: Lane, checked: dict[int, Prefix | None]) -> None:
        """Cancel a streamed request (vLLM aborts it); keep its finished choices, and continue each
        unfinished one on `target` from what it had made when checked."""
        stream, work = flight.stream, flight.work
        assert stream is not None
        flight.moved = True
        self.moves += 1
        if flight.task is not None:
            flight.task.cancel()
        self._hooks.land(flight)
        unfinished = stream.unfinished()
        for i, sample_index in enumerate(work.samples):
            if i in unfinished:
                rest = Work(work.prompt_index, work.prompt, [sample_index], work.attempts, prefix=checked[i])
                self._hooks.launch(rest, target, None)
                continue
            latency = time.monotonic() - flight.started
            done = stream.sample(i, flight.endpoint.url, self._sampling, work.prompt_index, sample_index, latency)
            flight.lane.completed += 1
            flight.lane.tokens += done.completion_tokens or 0
            self.finished.append(work.prefix.join(done) if work.prefix else done)
        self._hooks.wake()


def _rate(lane: Lane) -> float:
    return lane.endpoint.gauges.peak_tokens_per_s


def _made(stream: Stream) -> int:
    """Tokens the unfinished choices of a streamed request have made."""
    return sum(len(c.token_ids) for c in stream.choices if c.finish_reason is None)


def _token_s(lane: Lane, more: int) -> float:
    """A running sequence's time per token on the lane's server with `more` sequences than it has
    (moves on their way there included): its batch (the lane's load: what the server runs, not the
    finished choices still in flight) over its peak generation rate, the batch counted as at least
    MOVE_MIN_BATCH (see there)."""
    return max(lane.load + lane.reserved + more, MOVE_MIN_BATCH) / _rate(lane)


def _step_after(lane: Lane, more: int) -> float:
    """The server's decode step (s per token of a sequence) with `more` sequences than at its last
    reading: the step grows in proportion to the batch, never below the fastest seen (an idle
    server's step is its fastest)."""
    g = lane.endpoint.gauges
    step = g.step_s if g.running >= 1 else g.min_step_s
    running = max(1.0, g.running)
    batch = max(1.0, g.running + lane.endpoint.since_poll() + more)
    return max(g.min_step_s, step * batch / running)
