"""mvllmd's lifecycle: start-up, serve, drain, stop (in the manner of uvicorn's Server).

Start-up binds the gRPC listen addresses, takes the state-directory lock, picks the unit manager, reads
the device inventory, starts the instances and jobs, binds the HTTP front door's addresses, and only
then says READY=1. SIGTERM and SIGINT only set a flag; the daemon then says
STOPPING=1, refuses new calls, lets running ones finish within `drain_timeout_s`, and cancels the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections import Counter
from collections.abc import Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from mvllm import __version__
from mvllm.v1 import (
    daemon_pb2,
    daemon_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    instance_pb2,
    instance_pb2_grpc,
    job_pb2,
    job_pb2_grpc,
    tune_pb2,
    tune_pb2_grpc,
    weights_pb2,
    weights_pb2_grpc,
)
from mvllmd.addresses import HttpAddress, TcpAddress, fleet_only
from mvllmd.api.daemon_service import DaemonServicer
from mvllmd.api.fleet_service import FleetServicer
from mvllmd.api.instance_service import InstanceServicer
from mvllmd.api.job_service import JobServicer
from mvllmd.api.peers import PeerClient, fleet_credentials
from mvllmd.api.relay import Relay
from mvllmd.api.tune_service import TuneServicer
from mvllmd.api.weight_service import WeightServicer
from mvllmd.certs import identity
from mvllmd.config import Config
from mvllmd.daemon import Daemon
from mvllmd.dispatch.endpoints import Endpoints, Tuning
from mvllmd.errors import AddressError, ConfigError
from mvllmd.external.servers import ExternalServers
from mvllmd.external.store import ExternalStore
from mvllmd.fleet import Fleet
from mvllmd.frontdoor.app import FrontDoor
from mvllmd.frontdoor.instance_route import InstanceRoute
from mvllmd.frontdoor.servers import Servers
from mvllmd.hosts.hosts import Hosts, host_summary
from mvllmd.hosts.link import Dial, Summary
from mvllmd.hosts.membership import HostEntry, Membership
from mvllmd.instances.backends.choice import BackendKind, pick_backend
from mvllmd.instances.backends.process import ProcessBackend
from mvllmd.instances.backends.protocol import UnitBackend
from mvllmd.instances.backends.systemd import SystemdBackend
from mvllmd.instances.manager import InstanceManager
from mvllmd.inventory import Inventory, read_inventory
from mvllmd.jobs.manager import JobManager
from mvllmd.jobs.store import JobStore
from mvllmd.listeners import Listeners
from mvllmd.locks import PidLock
from mvllmd.metrics.prometheus import Metrics
from mvllmd.notify import Notifier
from mvllmd.overview import Overview
from mvllmd.transport import http as http_client
from mvllmd.tune.sweep import Tuner
from mvllmd.weights.updates import WeightUpdates

log = logging.getLogger(__name__)

SERVICES = (
    daemon_pb2.DESCRIPTOR.services_by_name["DaemonService"].full_name,
    instance_pb2.DESCRIPTOR.services_by_name["InstanceService"].full_name,
    job_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    weights_pb2.DESCRIPTOR.services_by_name["WeightService"].full_name,
    fleet_pb2.DESCRIPTOR.services_by_name["FleetService"].full_name,
    tune_pb2.DESCRIPTOR.services_by_name["TuneService"].full_name,
)
SERVER_OPTIONS = (
    # gRPC turns SO_REUSEPORT on by default; with it, a second daemon could bind the same TCP port.
    ("grpc.so_reuseport", 0),
    # Coordinators ping every 2 s to learn within seconds that a peer is gone (api/peers.py); accept that.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
)


async def serve(config: Config, notifier: Notifier, under_systemd: bool, environ: Mapping[str, str]) -> None:
    """Run the daemon until SIGTERM or SIGINT. Raises MvllmError when it cannot start."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    listeners = Listeners(config.daemon.listen, config.daemon.socket_group, config.daemon.tls)
    try:
        bound = listeners.bind(server)  # first: a bad address fails before anything is touched
        state_lock = _lock_state_dir(config)
        try:
            metrics = Metrics()
            daemon = await _start_up(config, notifier, under_systemd, environ, metrics)
            endpoints = daemon.endpoints
            daemon.listen_addresses = bound
            http = config.http
            servers = Servers(endpoints, daemon.fleet, session_idle_s=http.session_idle_s,
                              sticky_factor=http.sticky_factor)  # fmt: skip
            _measure(metrics, daemon, endpoints)
            hosts = daemon.fleet.hosts
            assert hosts is not None
            route = InstanceRoute(daemon.instances.target, hosts.tokens, http_client.Client())
            front = FrontDoor(servers, http.tokens, metrics, route=route)
            overview = Overview(daemon, endpoints, metrics)
            try:
                daemon.http_urls = hosts.http_urls = await _open_front_door(front, config)
                hosts.start()
                health = _add_services(server, daemon, overview)
                await server.start()
                await _run_until_signalled(daemon, health, notifier)
                notifier.stopping(f"stopping jobs (up to {config.jobs.stop_drain_s:g}s for requests in flight)")
                await daemon.jobs.close()
                daemon.instances.stop_watches()
                await _drain(server, health, notifier, config.daemon.drain_timeout_s)
            finally:
                overview.close()
                await front.close()
                await daemon.jobs.close()
                await hosts.close()
                await daemon.weights.close()
                await daemon.fleet.external.close()
                await daemon.instances.close()
                await endpoints.close()
        finally:
            state_lock.release()
    finally:
        await server.stop(0)  # a no-op after a clean stop; releases the ports after a failed start
        listeners.close()


def _lock_state_dir(config: Config) -> PidLock:
    state_dir = config.daemon.state_dir
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the state directory {state_dir}: {exc.strerror}") from exc
    lock = PidLock(state_dir / "mvllmd.lock", f"the state directory {state_dir}")
    lock.acquire()
    return lock


async def _open_front_door(front: FrontDoor, config: Config) -> tuple[str, ...]:
    """Bind the front door's addresses (after the state lock: a second daemon is refused for that);
    return their URLs, with the ports picked for port 0."""
    urls = []
    for address in config.http.listen:
        context = config.daemon.tls.http_context() if address.tls and config.daemon.tls else None
        only = fleet_only(address, config.http.insecure_http, bool(config.http.tokens))
        try:
            host, port = await front.listen(address.tcp.host, address.tcp.port, context, fleet_only=only)
        except OSError as exc:
            raise AddressError(
                f"cannot listen on {address} (the HTTP front door): {exc.strerror or exc}; pass --http-listen "
                "with another address, or --http-listen none"
            ) from None
        urls.append(str(HttpAddress(address.tls, TcpAddress(host, port))))
    front.servers.start()
    return tuple(urls)


def _measure(metrics: Metrics, daemon: Daemon, endpoints: Endpoints) -> None:
    """What the metrics read at each scrape: the instances by engine and state, the external servers by
    state (engine "external"), and each server of the endpoint table (in flight, out, trips, hangs)."""
    metrics.count_servers(lambda: [(str(v.spec.engine), str(v.state)) for v in daemon.instances.list_instances()])
    metrics.count_servers(lambda: [("external", str(v.state)) for v in daemon.fleet.external.list_servers()])
    metrics.watch_servers(endpoints.all)


async def _start_up(
    config: Config,
    notifier: Notifier,
    under_systemd: bool,
    environ: Mapping[str, str],
    metrics: Metrics,
) -> Daemon:
    notifier.status("detecting the unit manager")
    manager = await asyncio.to_thread(pick_backend, config.daemon.unit_manager, os.geteuid())
    notifier.status("reading the device inventory")
    inventory = await asyncio.to_thread(
        read_inventory, config.inventory.gpu_source, config.inventory.cpu_slots, config.inventory.sim_gpus
    )
    counts = Counter(str(d.kind) for d in inventory.devices)
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "none"
    log.info("unit manager: %s; devices: %s (GPUs read from %s)", manager, summary, inventory.gpu_source)

    async def fresh_inventory() -> Inventory:
        settings = config.inventory
        return await asyncio.to_thread(read_inventory, settings.gpu_source, settings.cpu_slots, settings.sim_gpus)

    instances = InstanceManager(config, _backend(manager, config, environ), fresh_inventory)
    # One Endpoint per server for jobs and the front door; an instance's weights are shared with it.
    endpoints = Endpoints(Tuning.of(config.jobs, door_reserve=config.http.reserve), weights_of=instances.weights_of)
    weights = WeightUpdates(instances, endpoints)
    weights.start()  # before the instances: a re-adopted one is told its version when it is READY
    notifier.status("re-adopting instances")
    await instances.start()
    external = _external_servers(config, instances)
    await external.start()

    async def own() -> Summary:
        return host_summary(await fresh_inventory(), instances.holders(), len(instances.list_instances()))

    fleet = Fleet(instances, external, _hosts(config, own))
    store = JobStore(config.daemon.state_dir / "jobs.sqlite3")
    jobs = JobManager(store, fleet, config.jobs, resume_wait_s=config.instances.start_timeout_s,
                      endpoints=endpoints, events=metrics)  # fmt: skip
    notifier.status("resuming jobs")
    await jobs.start()
    tuner = Tuner(instances, fresh_inventory, config)
    return Daemon(config=config, unit_manager=manager, under_systemd=under_systemd, instances=instances, jobs=jobs,
                  fleet=fleet, endpoints=endpoints, weights=weights, tuner=tuner)  # fmt: skip


def _hosts(config: Config, own: Any) -> Hosts:
    """The fleet of hosts: this daemon's name (--fleet-name, else its certificate's, else the host name),
    its peers, and how it dials them (mutual TLS with its own certificate)."""
    tls = config.daemon.tls
    name = config.fleet.name
    if not name and tls is not None:
        mine = identity(tls.cert.read_bytes())
        name = mine.name if mine is not None else ""
    membership = Membership(name or socket.gethostname(), config.fleet.hosts, config.daemon.state_dir)
    try:
        credentials, refusal = fleet_credentials(tls), ""
    except ConfigError as exc:
        credentials, refusal = None, str(exc)
    if tls is not None and tls.client_ca is not None:
        http_client.trust(str(tls.client_ca))  # the peers' HTTP listeners

    def dial(entry: HostEntry) -> PeerClient:
        return PeerClient(entry, credentials)

    peers: Dial = dial
    return Hosts(membership, peers, own, refusal)


def _external_servers(config: Config, instances: InstanceManager) -> ExternalServers:
    def local() -> dict[str, str]:
        return {view.spec.name: view.spec.url for view in instances.list_instances()}

    store = ExternalStore(config.daemon.state_dir)
    return ExternalServers(store, config.instances, config.jobs.endpoint_max_num_seqs, local)


def _backend(manager: BackendKind, config: Config, environ: Mapping[str, str]) -> UnitBackend:
    state_dir = config.daemon.state_dir
    if manager is BackendKind.PROCESS:
        return ProcessBackend(state_dir)
    return SystemdBackend("user" if manager is BackendKind.SYSTEMD_USER else "system", state_dir, dict(environ))


async def _drain(server: Any, health: Any, notifier: Notifier, timeout_s: float) -> None:
    notifier.stopping(f"draining (up to {timeout_s:g}s)")
    log.info("stopping: refusing new calls, draining for up to %gs", timeout_s)
    await health.enter_graceful_shutdown()
    await server.stop(timeout_s)
    log.info("stopped")


def _add_services(server: Any, daemon: Daemon, overview: Overview | None = None) -> Any:
    hosts = daemon.fleet.hosts
    relay = Relay(hosts) if hosts is not None else None
    daemon_pb2_grpc.add_DaemonServiceServicer_to_server(DaemonServicer(daemon, overview, relay), server)
    instance_pb2_grpc.add_InstanceServiceServicer_to_server(
        InstanceServicer(daemon.instances, daemon.fleet.external, relay), server
    )
    job_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(daemon.jobs), server)
    weights_pb2_grpc.add_WeightServiceServicer_to_server(WeightServicer(daemon.weights, relay), server)
    tune_pb2_grpc.add_TuneServiceServicer_to_server(TuneServicer(daemon.tuner, relay), server)
    if hosts is not None:
        fleet_pb2_grpc.add_FleetServiceServicer_to_server(FleetServicer(hosts), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    return health


async def _run_until_signalled(daemon: Daemon, health: Any, notifier: Notifier) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    serving = health_pb2.HealthCheckResponse.SERVING
    await health.set("", serving)
    for name in SERVICES:
        await health.set(name, serving)
    addresses = ", ".join(daemon.listen_addresses)
    log.info("mvllmd %s serving on %s", __version__, addresses)
    notifier.ready(f"serving on {addresses}")
    watchdog = asyncio.create_task(notifier.run_watchdog())
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
