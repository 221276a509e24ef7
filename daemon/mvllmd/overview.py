"""One snapshot of what the daemon runs, for `mvllmctl top` (DaemonService.GetOverview).

It is assembled from the home of each part, and counts nothing itself:

- GPUs: the real ones read through NVML (inventory.read_gpu_usage, in a thread); the simulated ones
  get a simulated reading (inventory.sim_gpu_usage) from the instances placed on them (the memory
  their --gpu-memory-utilization reserves) and whether those run sequences;
- servers: the instances (instances/manager.py) and the external servers (external/servers.py). Each
  one's running and waiting sequences and tokens/s are the endpoint table's gauges
  (dispatch/endpoints.py), read every second while a job or the front door uses the server (with the
  front door on, every READY server). A live server the table does not read now is read here
  (transport/gauges.scrape: all at once, SCRAPE_TIMEOUT_S each); its tokens/s comes from this
  module's previous reading of it (0 on the first);
- jobs: the job manager's views of those that have not ended;
- the front door: its counters where they are kept, the metrics (metrics.Events.door_totals), and its
  requests in flight from the table.

Rates over the refresh interval are the client's to take, from two snapshots' counters and uptimes;
the daemon adds only what it has anyway: each job's averages since its run began, and each server's
generation rate.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from mvllm import __version__
from mvllmd.daemon import Daemon
from mvllmd.dispatch.endpoint import Endpoint
from mvllmd.dispatch.endpoints import Endpoints
from mvllmd.errors import InventoryError
from mvllmd.external.state import ExternalView
from mvllmd.instances.placement import KIND_WORDS
from mvllmd.instances.spec import InstanceState
from mvllmd.instances.state import LIVE, InstanceView
from mvllmd.inventory import DeviceKind, GpuSource, GpuUsage, SimLoad, read_gpu_usage, sim_gpu_usage
from mvllmd.jobs.manager import JobView
from mvllmd.metrics import NO_EVENTS, DoorTotals, Events
from mvllmd.transport import http
from mvllmd.transport.gauges import Gauges, scrape

SCRAPE_TIMEOUT_S = 0.5  # a server read on demand that has not answered by then shows no gauges
FRESH_S = 3.0  # the table's gauges of a server are fresh while read within this long
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of each GPU's memory that an engine reserves
_JOB_ORDER = {"running": 0, "queued": 1}


class GaugeSource(enum.StrEnum):
    TABLE = "endpoint-table"  # the endpoint table's, read every second while a job or the front door uses it
    SCRAPED = "scraped"  # read for this snapshot
    NONE = "none"  # not answered in time, or not live


@dataclass(frozen=True)
class GpuView:
    usage: GpuUsage
    instances: tuple[str, ...]  # placed on it


@dataclass(frozen=True)
class ServerView:
    name: str
    engine: str  # "vllm", "sim" or "external"
    state: InstanceState
    url: str
    model: str
    max_num_seqs: int
    devices: tuple[str, ...] = ()
    running: int = 0
    waiting: int = 0
    tokens_per_s: float = 0.0
    gauges: GaugeSource = GaugeSource.NONE
    inflight: int = 0  # mvllmd's sequences in flight there
    door_inflight: int = 0  # the front door's part of them


@dataclass(frozen=True)
class DoorView:
    urls: tuple[str, ...]
    totals: DoorTotals
    inflight: int


@dataclass(frozen=True)
class Snapshot:
    taken_at: datetime
    uptime_s: float
    version: str
    hostname: str
    gpus: tuple[GpuView, ...]
    gpu_source: GpuSource
    servers: tuple[ServerView, ...]
    jobs: tuple[JobView, ...]
    door: DoorView


@dataclass(frozen=True)
class _Target:
    """A server to show, and what it takes to read its /metrics."""

    view: ServerView
    api_key: str
    live: bool


class Overview:
    def __init__(self, daemon: Daemon, endpoints: Endpoints | None = None, events: Events = NO_EVENTS) -> None:
        self._daemon = daemon
        self._endpoints = endpoints  # None: no table (every server is read on demand)
        self._events = events
        self._http = http.Client()
        self._scraped: dict[str, Gauges] = {}  # by URL: this module's own readings, for their rates

    def close(self) -> None:
        self._http.close()

    async def snapshot(self) -> Snapshot:
        gpus = asyncio.create_task(self._real_gpus())
        servers = await self._servers()
        real, source = await gpus
        daemon = self._daemon
        return Snapshot(
            taken_at=datetime.now(UTC),
            uptime_s=daemon.info().uptime_s,
            version=__version__,
            hostname=socket.gethostname(),
            gpus=(*self._placed(real, servers), *self._simulated(servers)),
            gpu_source=source,
            servers=servers,
            jobs=tuple(sorted((j for j in daemon.jobs.list_jobs() if not j.record.state.ended), key=_job_order)),
            door=DoorView(daemon.http_urls, self._events.door_totals(), sum(s.door_inflight for s in servers)),
        )

    # --- GPUs ----------------------------------------------------------------------------------------

    async def _real_gpus(self) -> tuple[tuple[GpuUsage, ...], GpuSource]:
        if self._daemon.config.inventory.gpu_source == "none":
            return (), GpuSource.NONE
        try:
            return await asyncio.to_thread(read_gpu_usage), GpuSource.NVML
        except InventoryError:
            return (), GpuSource.NONE

    def _placed(self, usage: tuple[GpuUsage, ...], servers: tuple[ServerView, ...]) -> list[GpuView]:
        return [GpuView(u, _holders(servers, u.kind, u.index)) for u in usage]

    def _simulated(self, servers: tuple[ServerView, ...]) -> list[GpuView]:
        count = self._daemon.config.inventory.sim_gpus
        specs = {v.spec.name: v.spec for v in self._daemon.instances.list_instances()}
        loads = [
            SimLoad(_indexes(s.devices, DeviceKind.SIM_GPU), memory_share(specs[s.name].argv), s.running)
            for s in servers
            if s.name in specs and s.state in LIVE
        ]
        return [GpuView(u, _holders(servers, u.kind, u.index)) for u in sim_gpu_usage(count, loads)]

    # --- servers -------------------------------------------------------------------------------------

    async def _servers(self) -> tuple[ServerView, ...]:
        targets = self._targets()
        now = time.monotonic()
        readings = [self._from_table(t, now) for t in targets]
        unread = [i for i, (t, r) in enumerate(zip(targets, readings, strict=True)) if r is None and t.live]
        scraped = await asyncio.gather(*(self._scrape(targets[i]) for i in unread))
        for i, reading in zip(unread, scraped, strict=True):
            readings[i] = reading
        self._scraped = {url: g for url, g in self._scraped.items() if any(t.view.url == url for t in targets)}
        return tuple(r or t.view for t, r in zip(targets, readings, strict=True))

    def _targets(self) -> list[_Target]:
        manager, external = self._daemon.instances, self._daemon.fleet.external
        keys = {v.spec.name: key for v, key in manager.serving(*LIVE)}
        external_keys = {v.spec.name: key for v, key in external.serving()}
        local = [_Target(_instance(v), keys.get(v.spec.name, ""), v.state in LIVE) for v in manager.list_instances()]
        attached = [
            _Target(_external(v), external_keys.get(v.spec.name, ""), v.state is not InstanceState.STOPPED)
            for v in external.list_servers()
        ]
        return local + attached

    def _from_table(self, target: _Target, now: float) -> ServerView | None:
        """The server with the table's counts, and its gauges if they are fresh; None: read it here."""
        endpoint = self._endpoints.find(target.view.url) if self._endpoints is not None else None
        if endpoint is None:
            return None
        view = _with_inflight(target.view, endpoint)
        gauges = endpoint.gauges
        if gauges.ok and now - gauges.at <= FRESH_S:
            return _with_gauges(view, gauges, GaugeSource.TABLE)
        return None

    async def _scrape(self, target: _Target) -> ServerView:
        url = target.view.url
        endpoint = self._endpoints.find(url) if self._endpoints is not None else None
        view = _with_inflight(target.view, endpoint) if endpoint is not None else target.view
        try:
            values = await scrape(self._http, url, target.api_key, SCRAPE_TIMEOUT_S)
        except (http.HttpError, OSError, TimeoutError, ValueError):
            self._scraped.pop(url, None)
            return view
        gauges = self._scraped.setdefault(url, Gauges())
        gauges.update(values, time.monotonic())
        return _with_gauges(view, gauges, GaugeSource.SCRAPED)


def memory_share(argv: tuple[str, ...]) -> float:
    """An engine's --gpu-memory-utilization among its arguments, else vLLM's default."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--gpu-memory-utilization" and i + 1 < len(argv) else ""
        if arg.startswith("--gpu-memory-utilization="):
            value = arg.split("=", 1)[1]
        try:
            share = float(value) if value else None
        except ValueError:
            share = None
        if share is not None and 0 < share <= 1:
            return share
    return GPU_MEMORY_UTILIZATION


def _instance(view: InstanceView) -> ServerView:
    spec = view.spec
    return ServerView(spec.name, str(spec.engine), view.state, spec.url, spec.served_model_name, spec.max_num_seqs,
                      spec.devices)  # fmt: skip


def _external(view: ExternalView) -> ServerView:
    spec = view.spec
    return ServerView(spec.name, "external", view.state, spec.url, spec.model, spec.max_num_seqs)


def _with_inflight(view: ServerView, endpoint: Endpoint) -> ServerView:
    return replace(view, inflight=max(0, endpoint.inflight), door_inflight=max(0, endpoint.door_inflight))


def _with_gauges(view: ServerView, gauges: Gauges, source: GaugeSource) -> ServerView:
    return replace(view, running=int(gauges.running), waiting=int(gauges.waiting),
                    tokens_per_s=gauges.smooth_tokens_per_s, gauges=source)  # fmt: skip


def _indexes(devices: tuple[str, ...], kind: DeviceKind) -> tuple[int, ...]:
    prefix = f"{KIND_WORDS[kind]}:"
    return tuple(int(d.removeprefix(prefix)) for d in devices if d.startswith(prefix) and d[len(prefix) :].isdigit())


def _holders(servers: tuple[ServerView, ...], kind: DeviceKind, index: int) -> tuple[str, ...]:
    """The live instances placed on a device."""
    return tuple(s.name for s in servers if s.state in LIVE and index in _indexes(s.devices, kind))


def _job_order(view: JobView) -> int:
    return _JOB_ORDER.get(str(view.record.state), 2)
