"""DaemonService: translates GetDaemonInfo, ListDevices and GetOverview between protos and the Daemon
(its overview is assembled by overview.py)."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from mvllm.convert import state_to_proto
from mvllm.v1 import daemon_pb2 as pb
from mvllm.v1 import daemon_pb2_grpc
from mvllmd.api.boundary import rpc
from mvllmd.api.instance_service import STATES as INSTANCE_STATES
from mvllmd.api.relay import Relay
from mvllmd.daemon import Daemon, DaemonInfo
from mvllmd.errors import InvalidRequest
from mvllmd.instances.backends.choice import BackendKind
from mvllmd.inventory import Device, DeviceKind, GpuSource, Inventory
from mvllmd.jobs.manager import JobView
from mvllmd.overview import DoorView, GaugeSource, GpuView, Overview, ServerView, Snapshot

UNIT_MANAGERS = {
    BackendKind.SYSTEMD_SYSTEM: pb.UNIT_MANAGER_SYSTEMD_SYSTEM,
    BackendKind.SYSTEMD_USER: pb.UNIT_MANAGER_SYSTEMD_USER,
    BackendKind.PROCESS: pb.UNIT_MANAGER_PROCESS,
}
DEVICE_KINDS = {
    DeviceKind.GPU: pb.DEVICE_KIND_GPU,
    DeviceKind.CPU_SLOT: pb.DEVICE_KIND_CPU_SLOT,
    DeviceKind.SIM_GPU: pb.DEVICE_KIND_SIM_GPU,
}
GPU_SOURCES = {
    GpuSource.NVML: pb.GPU_SOURCE_NVML,
    GpuSource.NVIDIA_SMI: pb.GPU_SOURCE_NVIDIA_SMI,
    GpuSource.NONE: pb.GPU_SOURCE_NONE,
}
KINDS_BY_PROTO = {v: k for k, v in DEVICE_KINDS.items()}
LIST_TIMEOUT_S = 10.0
GAUGE_SOURCES = {
    GaugeSource.TABLE: pb.GAUGE_SOURCE_ENDPOINT_TABLE,
    GaugeSource.SCRAPED: pb.GAUGE_SOURCE_SCRAPED,
    GaugeSource.NONE: pb.GAUGE_SOURCE_NONE,
}


class DaemonServicer(daemon_pb2_grpc.DaemonServiceServicer):  # type: ignore[misc]  # untyped stub base
    def __init__(self, daemon: Daemon, overview: Overview | None = None, relay: Relay | None = None) -> None:
        self._daemon = daemon
        self._overview = overview or Overview(daemon)
        self._relay = relay

    @rpc
    async def GetDaemonInfo(self, request: pb.GetDaemonInfoRequest, context: Any) -> pb.GetDaemonInfoResponse:
        return info_to_proto(self._daemon.info())

    @rpc
    async def ListDevices(self, request: pb.ListDevicesRequest, context: Any) -> pb.ListDevicesResponse:
        kind = KINDS_BY_PROTO.get(request.kind)  # UNSPECIFIED (and unknown values) list everything
        if not request.hosts:
            return inventory_to_proto(await self._daemon.devices(kind), self._relay.name if self._relay else "")
        if self._relay is None:
            raise InvalidRequest("this daemon has no fleet of hosts")
        mine, links = self._relay.chosen(request.hosts)
        there = pb.ListDevicesRequest(kind=request.kind)
        answers, failures = await self._relay.each(
            links, lambda _, ch: daemon_pb2_grpc.DaemonServiceStub(ch).ListDevices(there, timeout=LIST_TIMEOUT_S)
        )
        response = pb.ListDevicesResponse(failures=failures)
        if mine:
            response.MergeFrom(inventory_to_proto(await self._daemon.devices(kind), self._relay.name))
        for host, answer in answers:
            for device in answer.devices:
                device.fleet_host = host
            response.devices.extend(answer.devices)
        return response

    @rpc
    async def GetOverview(self, request: pb.GetOverviewRequest, context: Any) -> pb.GetOverviewResponse:
        return overview_to_proto(await self._overview.snapshot())


def info_to_proto(info: DaemonInfo) -> pb.GetDaemonInfoResponse:
    start = Timestamp()
    start.FromDatetime(info.start_time)
    return pb.GetDaemonInfoResponse(
        version=info.version,
        hostname=info.hostname,
        start_time=start,
        uptime_seconds=info.uptime_s,
        unit_manager=UNIT_MANAGERS[info.unit_manager],
        listen_addresses=list(info.listen_addresses),
        state_dir=str(info.state_dir),
        pid=info.pid,
        under_systemd=info.under_systemd,
        http_urls=list(info.http_urls),
    )


def inventory_to_proto(inventory: Inventory, host: str = "") -> pb.ListDevicesResponse:
    response = pb.ListDevicesResponse(
        devices=[device_to_proto(d) for d in inventory.devices],
        gpu_source=GPU_SOURCES[inventory.gpu_source],
    )
    for device in response.devices:
        device.fleet_host = host
    return response


def device_to_proto(device: Device) -> pb.Device:
    return pb.Device(
        kind=DEVICE_KINDS[device.kind],
        index=device.index,
        uuid=device.uuid,
        name=device.name,
        memory_total_bytes=device.memory_total_bytes,
        memory_free_bytes=device.memory_free_bytes,
        processes=[
            pb.DeviceProcess(pid=p.pid, name=p.name, used_memory_bytes=p.used_memory_bytes) for p in device.processes
        ],
        instance=device.instance,
    )


def overview_to_proto(snapshot: Snapshot) -> pb.GetOverviewResponse:
    taken = Timestamp()
    taken.FromDatetime(snapshot.taken_at)
    return pb.GetOverviewResponse(
        taken_at=taken,
        uptime_seconds=snapshot.uptime_s,
        version=snapshot.version,
        hostname=snapshot.hostname,
        gpus=[gpu_to_proto(g) for g in snapshot.gpus],
        gpu_source=GPU_SOURCES[snapshot.gpu_source],
        servers=[server_to_proto(s) for s in snapshot.servers],
        jobs=[job_to_proto(j) for j in snapshot.jobs],
        front_door=door_to_proto(snapshot.door),
    )


def gpu_to_proto(gpu: GpuView) -> pb.OverviewGpu:
    u = gpu.usage
    return pb.OverviewGpu(
        kind=DEVICE_KINDS[u.kind],
        index=u.index,
        uuid=u.uuid,
        name=u.name,
        utilization=u.utilization,
        memory_used_bytes=u.memory_used_bytes,
        memory_total_bytes=u.memory_total_bytes,
        instances=list(gpu.instances),
    )


def server_to_proto(server: ServerView) -> pb.OverviewServer:
    return pb.OverviewServer(
        name=server.name,
        engine=server.engine,
        state=INSTANCE_STATES[server.state],
        url=server.url,
        model=server.model,
        running=server.running,
        waiting=server.waiting,
        tokens_per_second=server.tokens_per_s,
        gauges=GAUGE_SOURCES[server.gauges],
        max_num_seqs=server.max_num_seqs,
        inflight=server.inflight,
        door_inflight=server.door_inflight,
        devices=list(server.devices),
    )


def job_to_proto(view: JobView) -> pb.OverviewJob:
    record = view.record
    return pb.OverviewJob(
        id=record.id,
        state=state_to_proto(record.state),
        model=record.spec.model,
        samples_total=record.samples_total,
        samples_done=record.samples_done,
        errors=record.errors,
        completion_tokens=record.completion_tokens,
        samples_per_second=view.samples_per_s,
        tokens_per_second=view.tokens_per_s,
        eta_seconds=view.eta_s,
        inflight=view.inflight,
        output_path=str(record.spec.output_path),
        message=record.message,
    )


def door_to_proto(door: DoorView) -> pb.OverviewFrontDoor:
    totals = door.totals
    return pb.OverviewFrontDoor(
        urls=list(door.urls),
        requests_total=totals.requests,
        errors_total=totals.errors,
        statuses=[pb.StatusCount(status=status, requests=count) for status, count in totals.statuses],
        retries_total=totals.retries,
        continued_streams_total=totals.continued,
        stream_errors_total=totals.stream_errors,
        inflight=door.inflight,
    )
