"""One job's accounting: the work it has, the requests it has in flight, and its part of each server.

- `Work`: one prompt and the sample indexes it still needs (and, for a moved sample, what it made).
- `Flight`: one request on its way: its work, its lane, its task, its stream, its copy or original.
- `Lane`: one job's view of one Endpoint (or the front door's, for one model): the samples it has in
  flight there, its requests there, and its own counts (the Endpoint holds what every user shares).
- `Flights`: every request of the job in flight, and the counts that go with them. A request counts
  the samples it asked for until it lands; a streamed choice that finishes gives its place back at
  once (`release`). Landing is idempotent: a request may be landed by whoever learns first that it
  is over (its answer, a cancel, the hang watch).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import ClassVar

from mvllmd.dispatch.endpoint import Endpoint
from mvllmd.transport.streams import Prefix, Stream


@dataclass
class Work:
    prompt_index: int
    prompt: str | list[dict[str, str]] | None
    samples: list[int]
    attempts: int = 0
    last_error: str = ""
    prefix: Prefix | None = None  # a moved sample (one): what it had made


@dataclass(eq=False)
class Lane:
    endpoint: Endpoint
    inflight: int = 0  # this job's samples in flight there
    completed: int = 0  # this job's samples it answered
    tokens: int = 0
    reserved: int = 0  # samples that will move to it once their check is back
    ghosts: int = 0  # samples of its requests not streamed beyond one each: choices that may have ended
    requests: dict[int, Flight] = field(default_factory=dict)  # in the order they were sent
    left: bool = False  # the server left (its instance stopped): nothing new goes there
    version: int = 0  # for the policy's index: bumped whenever its key may have changed
    weight_version: str = ""  # the job's --weight-version: the server is usable only while it serves that
    door: ClassVar[bool] = False  # the front door's lane (DoorLane), not a job's

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def load(self) -> int:
        """What the server runs that this job must count: its own samples and other clients' (other
        jobs have their shares), or what the server runs in all where that is less (Endpoint.seen:
        a request's finished choices count in flight until the whole request is back), less at most
        those choices (`ghosts`: a reading that missed requests on their way must not free places)."""
        own, seen = self.inflight + self.endpoint.external, self.endpoint.seen
        return own if own <= seen else max(seen, own - self.ghosts)

    @property
    def limit(self) -> int:
        """This job's share of the server's limit in effect."""
        return self.endpoint.share()

    def usable(self, now: float) -> bool:
        return (
            not self.left
            and (not self.weight_version or self.weight_version == self.endpoint.weights.version)
            and self.endpoint.usable(now)
        )

    def available(self, now: float) -> bool:
        """Usable, with room under this job's share."""
        return self.usable(now) and self.load < self.limit


@dataclass(eq=False)
class DoorLane(Lane):
    """The front door's view of one Endpoint, for one model: it counts everything on the server, and
    may fill all of its limit (jobs leave it room: Endpoint.kept)."""

    door: ClassVar[bool] = True

    @property
    def load(self) -> int:
        return self.endpoint.load

    @property
    def limit(self) -> int:
        return self.endpoint.limit


@dataclass(eq=False)
class Flight:
    id: int
    work: Work
    lane: Lane
    task: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.monotonic)
    hedge_of: Flight | None = None  # on a copy: the request it copies
    copy: Flight | None = None  # on a hedged request: its copy
    hedged: bool = False
    stream: Stream | None = None  # a streamed request: what each choice has made so far
    moved: bool = False
    checking: bool = False  # a move's check of where it would cut is on its way
    split_at: int = -1  # tokens made when that check found a character split at the cut
    # Samples counted in flight for it: those it asked for, less (streamed) the choices finished. Not
    # len(work.samples): a Work sent again (hung endpoint) may be cut while this request still lands.
    held: int = 0
    ghosts: int = 0  # not streamed: its samples beyond one, which may end before the request does

    @property
    def endpoint(self) -> Endpoint:
        return self.lane.endpoint

    def twins(self) -> list[Flight]:
        return [f for f in (self.copy, self.hedge_of) if f is not None]


class Flights:
    """The job's requests in flight, by id, and how many samples they hold."""

    def __init__(self) -> None:
        self._by_id: dict[int, Flight] = {}
        self._ids = itertools.count()
        self.inflight = 0  # samples

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, flight: Flight) -> bool:
        return flight.id in self._by_id

    def all(self) -> list[Flight]:
        return list(self._by_id.values())

    def open(self, work: Work, lane: Lane, hedge_of: Flight | None = None, streamed: bool = False) -> Flight:
        flight = Flight(next(self._ids), work, lane, hedge_of=hedge_of, held=len(work.samples))
        if not streamed:
            flight.ghosts = max(0, flight.held - 1)
            lane.ghosts += flight.ghosts
        if hedge_of is not None:
            hedge_of.copy = flight
        self._by_id[flight.id] = flight
        lane.requests[flight.id] = flight
        lane.inflight += flight.held
        lane.endpoint.sent(flight.held, lane.door)
        self.inflight += flight.held
        return flight

    def release(self, flight: Flight) -> bool:
        """One streamed choice of `flight` finished: one sample fewer in flight. False if it had landed."""
        if flight.id not in self._by_id or flight.held <= 0:
            return False
        flight.held -= 1
        self._count(flight.lane, -1)
        return True

    def land(self, flight: Flight) -> bool:
        """`flight` is over, however it ended; False if it had landed already."""
        if self._by_id.pop(flight.id, None) is None:
            return False
        flight.lane.requests.pop(flight.id, None)
        flight.lane.ghosts -= flight.ghosts
        self._count(flight.lane, -flight.held)
        return True

    def _count(self, lane: Lane, samples: int) -> None:
        lane.inflight += samples
        self.inflight += samples
        lane.endpoint.landed(-samples, lane.door)
