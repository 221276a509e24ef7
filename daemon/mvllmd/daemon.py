"""The daemon as the API sees it: who it is, where it listens, and what devices it has."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from mvllm import __version__
from mvllmd.config import Config
from mvllmd.dispatch.endpoints import Endpoints
from mvllmd.fleet import Fleet
from mvllmd.instances.backends.choice import BackendKind
from mvllmd.instances.manager import InstanceManager
from mvllmd.instances.placement import device_ref
from mvllmd.inventory import DeviceKind, Inventory, read_inventory
from mvllmd.jobs.manager import JobManager
from mvllmd.tune.sweep import Tuner
from mvllmd.weights.updates import WeightUpdates


@dataclass(frozen=True)
class DaemonInfo:
    version: str
    hostname: str
    start_time: datetime
    uptime_s: float
    unit_manager: BackendKind  # the API's name, and the --unit-manager flag's
    listen_addresses: tuple[str, ...]
    state_dir: Path
    pid: int
    under_systemd: bool
    http_urls: tuple[str, ...] = ()


@dataclass
class Daemon:
    config: Config
    unit_manager: BackendKind
    under_systemd: bool
    instances: InstanceManager
    jobs: JobManager
    fleet: Fleet  # every server work may go to: the instances, and the external servers (fleet.external)
    endpoints: Endpoints  # one Endpoint per server in use, shared by the jobs and the front door
    weights: WeightUpdates  # updates, sleep and wake of the instances with weight updates on
    tuner: Tuner  # `mvllmctl tune`: sweeps of the ways to split this host's devices
    listen_addresses: tuple[str, ...] = ()
    http_urls: tuple[str, ...] = ()  # the HTTP front door's, with the ports picked for port 0
    start_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    _started: float = field(default_factory=time.monotonic)

    def info(self) -> DaemonInfo:
        return DaemonInfo(
            version=__version__,
            hostname=socket.gethostname(),
            start_time=self.start_time,
            uptime_s=time.monotonic() - self._started,
            unit_manager=self.unit_manager,
            listen_addresses=self.listen_addresses,
            state_dir=self.config.daemon.state_dir,
            pid=os.getpid(),
            under_systemd=self.under_systemd,
            http_urls=self.http_urls,
        )

    async def devices(self, kind: DeviceKind | None = None) -> Inventory:
        """Read the inventory afresh: free memory and the processes on a GPU change all the time."""
        settings = self.config.inventory
        inventory = await asyncio.to_thread(read_inventory, settings.gpu_source, settings.cpu_slots, settings.sim_gpus)
        holders = self.instances.holders()
        devices = [replace(d, instance=holders.get(device_ref(d), "")) for d in inventory.devices]
        return replace(inventory, devices=tuple(d for d in devices if kind is None or d.kind is kind))
