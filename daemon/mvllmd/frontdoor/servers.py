"""The front door's servers: per model, a lane on each READY instance, picked least-loaded.

The front door is one more user of the daemon's endpoint table (dispatch/endpoints.py), as a job is:
the Endpoint of each server (its breaker, hang watch, gauges, speed) is the one every job shares, and
the front door holds a Lane on it per model with the jobs' least-loaded policy over them. Its
requests count in the server's load (Endpoint.inflight) like a job's samples do (a request for n
choices counts n), but it takes no share of the server's limit from the jobs: an idle front door
must not halve a job's batch (it did, in the first version: 15% fewer samples/s through mvllmd).

Sessions (sticky least-loaded): a request that names a session goes where the session's last request
went, so that a multi-turn agent finds its prefix in that server's cache, unless that server is out,
gone, or would take more than `sticky_factor` times as long as the least-loaded one (load per unit of
speed, counting the request); then the session moves there. A session unused for `session_idle_s` is
forgotten. Pure hashing fails the other way: one saturated server keeps its sessions while others idle.

Weights (weights/): a request that names a version (X-Mvllm-Weight-Version) goes only to a server
at that version. A server paused for an update is used only when no other can be: the request waits
in its queue, and runs on the new weights once the update ends.

Which servers: the daemon's READY servers (fleet.py: its instances and the external servers attached to
it), by served model name, followed through the fleet's changes; a server that leaves (stopped, failed,
UNHEALTHY, detached) is left at once. Its requests in flight go elsewhere at once (`watch`: proxy.py
sends one not yet answered to another server, and continues a stream), as do those of a server the
endpoint table takes out as hung.

What the metrics read (metrics/): each server's requests in flight and breaker (`load`), hang events
(the table's listener), and breaker trips, seen as a new `open_until` at each round of readings or
scrape that is not a hang's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mvllmd.config import DEFAULTS
from mvllmd.dispatch.endpoint import Endpoint
from mvllmd.dispatch.endpoints import Endpoints, Listener
from mvllmd.dispatch.flights import DoorLane, Flight, Flights, Lane, Work
from mvllmd.dispatch.policies.least_loaded import LeastLoaded
from mvllmd.fleet import Fleet

log = logging.getLogger(__name__)


SWEEP_EVERY = 4096  # sessions are swept for idle ones once per this many new ones


@dataclass
class _Model:
    """One model's servers: a lane on each, the policy over them, the requests in flight."""

    policy: LeastLoaded = field(default_factory=lambda: LeastLoaded(per_sequence=True))
    lanes: dict[str, Lane] = field(default_factory=dict)  # by URL
    flights: Flights = field(default_factory=Flights)
    sessions: dict[str, tuple[str, float]] = field(default_factory=dict)  # session -> (URL, last used)
    opened: int = 0  # sessions opened since the last sweep


def _updating(lane: Lane) -> bool:
    return not lane.left and lane.endpoint.weights.updating


class Servers:
    def __init__(self, endpoints: Endpoints, fleet: Fleet, *,
                 session_idle_s: float = DEFAULTS["http.session_idle_s"],
                 sticky_factor: float = DEFAULTS["http.sticky_factor"]) -> None:  # fmt: skip
        self._endpoints = endpoints
        self._fleet = fleet
        self._session_idle_s = session_idle_s
        self._sticky_factor = sticky_factor
        self._models: dict[str, _Model] = {}
        self._changes = fleet.subscribe()
        self._watched: dict[Flight, asyncio.Future[None]] = {}  # requests in flight -> set when their server goes
        self._listener = Listener(read=self._read, lost=self._lost)
        endpoints.listen(self._listener)
        self._follow: asyncio.Task[None] | None = None
        self.sync()

    def start(self) -> None:
        self._follow = asyncio.create_task(self._follow_instances())

    async def close(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            await asyncio.gather(self._follow, return_exceptions=True)
        self._changes.close()
        self._endpoints.unlisten(self._listener)
        for model in self._models.values():
            for lane in list(model.lanes.values()):
                self._leave(model, lane)
        self._models.clear()

    # --- which servers -----------------------------------------------------------------------------

    def models(self) -> list[str]:
        """The models some server serves now, sorted."""
        return sorted(name for name, model in self._models.items() if model.lanes)

    def serves(self, model: str) -> bool:
        """Whether some server serves `model` now."""
        found = self._models.get(model)
        return found is not None and bool(found.lanes)

    def api_keys(self, model: str) -> bool:
        """Whether any server of `model` wants an API key."""
        found = self._models.get(model)
        return found is not None and any(lane.endpoint.api_key for lane in found.lanes.values())

    def sync(self) -> None:
        """Join the fleet's READY servers, and leave those that are no longer READY."""
        ready: dict[str, dict[str, tuple[int, str]]] = {}
        for server in self._fleet.ready():
            ready.setdefault(server.model, {})[server.url] = (server.capacity, server.api_key)
        for name in set(self._models) | set(ready):
            model = self._models.setdefault(name, _Model())
            wanted = ready.get(name, {})
            for url, lane in list(model.lanes.items()):
                if url not in wanted or wanted[url][1] != lane.endpoint.api_key:
                    self._leave(model, lane)
            for url, (capacity, key) in wanted.items():
                if url not in model.lanes:
                    lane = DoorLane(self._endpoints.join(url, capacity, key, shares=False))
                    model.lanes[url] = lane
                    model.policy.add(lane)

    def _leave(self, model: _Model, lane: Lane) -> None:
        self._release(lambda flight: flight.lane is lane)
        lane.left = True
        model.policy.remove(lane)
        del model.lanes[lane.url]
        self._endpoints.leave(lane.endpoint, shares=False)

    async def _follow_instances(self) -> None:
        while True:
            await self._changes.changed()
            try:
                self.sync()
            except Exception:  # a bug here must not stop the front door from following its servers
                log.exception("following the front door's servers failed")

    def _read(self) -> None:
        for model in self._models.values():
            model.policy.reindex()

    def _lost(self, endpoint: Endpoint) -> None:
        """`endpoint` hung, or an update aborts its requests: they go elsewhere now."""
        self._release(lambda flight: flight.endpoint is endpoint)

    def _release(self, which: Callable[[Flight], bool]) -> None:
        for flight, out in self._watched.items():
            if which(flight) and not out.done():
                out.set_result(None)

    # --- what the metrics read ---------------------------------------------------------------------

    def endpoints(self) -> list[Endpoint]:
        """The servers the front door may send to, one each."""
        found = {id(lane.endpoint): lane.endpoint for model in self._models.values() for lane in model.lanes.values()}
        return list(found.values())

    # --- requests ----------------------------------------------------------------------------------

    def pick(
        self, model: str, want: int, avoid: frozenset[str] = frozenset(), session: str = "", version: str = ""
    ) -> Lane | None:
        """The server for a request of `want` choices: the session's (see the module docstring), else the
        least-loaded usable one with room, not in `avoid` (URLs already tried), else the least-loaded
        usable one, room or not (a front-door request waits in the server's queue rather than be
        refused), else one paused for an update (it runs once the update ends); None when there is none.
        With `version`, only a server at that version of the weights."""
        found = self._models.get(model)
        if found is None:
            return None
        now = time.monotonic()
        if version:
            return self._pinned(found, want, now, avoid, version)
        best = self._least_loaded(found, want, now, avoid)
        if not session:
            return best
        sticky = self._sticky(found, session, now, avoid)
        policy = found.policy
        if sticky is not None and (
            best is None or policy.value(sticky, want) <= self._sticky_factor * policy.value(best, want)
        ):
            best = sticky
        if best is not None:
            self._remember(found, session, best.url, now)
        return best

    def _least_loaded(self, found: _Model, want: int, now: float, avoid: frozenset[str]) -> Lane | None:
        avoided = [lane for url, lane in found.lanes.items() if url in avoid]
        lane = found.policy.pick(want, now, avoided)
        if lane is not None:
            return lane
        usable = [lane for url, lane in found.lanes.items() if url not in avoid and lane.usable(now)]
        usable = usable or [lane for url, lane in found.lanes.items() if url not in avoid and _updating(lane)]
        return min(usable, key=lambda lane: found.policy.value(lane, want), default=None)

    def _pinned(self, found: _Model, want: int, now: float, avoid: frozenset[str], version: str) -> Lane | None:
        """The least-loaded server at `version` (X-Mvllm-Weight-Version), one not tried first."""
        at = [lane for lane in found.lanes.values() if lane.endpoint.weights.version == version]
        usable = [lane for lane in at if lane.usable(now)] or [lane for lane in at if _updating(lane)]
        fresh = [lane for lane in usable if lane.url not in avoid] or usable
        return min(fresh, key=lambda lane: found.policy.value(lane, want), default=None)

    def _sticky(self, found: _Model, session: str, now: float, avoid: frozenset[str]) -> Lane | None:
        """The session's server, if it has one, still there and usable, and the session is not idle."""
        url, used = found.sessions.get(session, ("", 0.0))
        lane = found.lanes.get(url)
        if lane is None or now - used > self._session_idle_s or url in avoid or not lane.usable(now):
            return None
        return lane

    def _remember(self, found: _Model, session: str, url: str, now: float) -> None:
        if session not in found.sessions:
            found.opened += 1
            if found.opened >= SWEEP_EVERY:
                found.opened = 0
                idle = [s for s, (_, used) in found.sessions.items() if now - used > self._session_idle_s]
                for gone in idle:
                    del found.sessions[gone]
        found.sessions[session] = (url, now)

    def watch(self, flight: Flight) -> asyncio.Future[None]:
        """A future set if `flight`'s server is taken out as hung or leaves before the flight lands."""
        out = self._watched[flight] = asyncio.get_running_loop().create_future()
        if flight.lane.left:
            out.set_result(None)
        return out

    def send(self, model: str, lane: Lane, want: int) -> Flight:
        """Count a request of `want` choices to `lane` as in flight."""
        flight = self._models[model].flights.open(Work(-1, None, list(range(want))), lane)
        self._models[model].policy.changed(lane)
        return flight

    def land(self, model: str, flight: Flight, ok: bool | None) -> None:
        """The request is over: answered (`ok`), failed in a way that counts against the server
        (False), or neither (None: the client left, a 4xx)."""
        found = self._models.get(model)
        now = time.monotonic()
        self._watched.pop(flight, None)
        if ok:
            flight.endpoint.succeeded(flight.held, now - flight.started, now)
        elif ok is False:
            flight.endpoint.failed(flight.started, now)
        if found is not None and found.flights.land(flight):
            found.policy.changed(flight.lane)
