"""DaemonService: translates GetDaemonInfo and ListDevices between protos and the Daemon."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from mvllm.v1 import daemon_pb2 as pb
from mvllm.v1 import daemon_pb2_grpc
from mvllmd.api.boundary import rpc
from mvllmd.daemon import Daemon, DaemonInfo
from mvllmd.instances.backends.choice import BackendKind
from mvllmd.inventory import Device, DeviceKind, GpuSource, Inventory

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


class DaemonServicer(daemon_pb2_grpc.DaemonServiceServicer):  # type: ignore[misc]  # untyped stub base
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    @rpc
    async def GetDaemonInfo(self, request: pb.GetDaemonInfoRequest, context: Any) -> pb.GetDaemonInfoResponse:
        return info_to_proto(self._daemon.info())

    @rpc
    async def ListDevices(self, request: pb.ListDevicesRequest, context: Any) -> pb.ListDevicesResponse:
        kind = KINDS_BY_PROTO.get(request.kind)  # UNSPECIFIED (and unknown values) list everything
        return inventory_to_proto(await self._daemon.devices(kind))


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


def inventory_to_proto(inventory: Inventory) -> pb.ListDevicesResponse:
    return pb.ListDevicesResponse(
        devices=[device_to_proto(d) for d in inventory.devices],
        gpu_source=GPU_SOURCES[inventory.gpu_source],
    )


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
