import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UnitManager(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNIT_MANAGER_UNSPECIFIED: _ClassVar[UnitManager]
    UNIT_MANAGER_SYSTEMD_SYSTEM: _ClassVar[UnitManager]
    UNIT_MANAGER_SYSTEMD_USER: _ClassVar[UnitManager]
    UNIT_MANAGER_PROCESS: _ClassVar[UnitManager]

class DeviceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_KIND_UNSPECIFIED: _ClassVar[DeviceKind]
    DEVICE_KIND_GPU: _ClassVar[DeviceKind]
    DEVICE_KIND_CPU_SLOT: _ClassVar[DeviceKind]
    DEVICE_KIND_SIM_GPU: _ClassVar[DeviceKind]

class GpuSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GPU_SOURCE_UNSPECIFIED: _ClassVar[GpuSource]
    GPU_SOURCE_NVML: _ClassVar[GpuSource]
    GPU_SOURCE_NVIDIA_SMI: _ClassVar[GpuSource]
    GPU_SOURCE_NONE: _ClassVar[GpuSource]
UNIT_MANAGER_UNSPECIFIED: UnitManager
UNIT_MANAGER_SYSTEMD_SYSTEM: UnitManager
UNIT_MANAGER_SYSTEMD_USER: UnitManager
UNIT_MANAGER_PROCESS: UnitManager
DEVICE_KIND_UNSPECIFIED: DeviceKind
DEVICE_KIND_GPU: DeviceKind
DEVICE_KIND_CPU_SLOT: DeviceKind
DEVICE_KIND_SIM_GPU: DeviceKind
GPU_SOURCE_UNSPECIFIED: GpuSource
GPU_SOURCE_NVML: GpuSource
GPU_SOURCE_NVIDIA_SMI: GpuSource
GPU_SOURCE_NONE: GpuSource

class GetDaemonInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetDaemonInfoResponse(_message.Message):
    __slots__ = ("version", "hostname", "start_time", "uptime_seconds", "unit_manager", "listen_addresses", "state_dir", "pid", "under_systemd", "http_urls")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UNIT_MANAGER_FIELD_NUMBER: _ClassVar[int]
    LISTEN_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    STATE_DIR_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UNDER_SYSTEMD_FIELD_NUMBER: _ClassVar[int]
    HTTP_URLS_FIELD_NUMBER: _ClassVar[int]
    version: str
    hostname: str
    start_time: _timestamp_pb2.Timestamp
    uptime_seconds: float
    unit_manager: UnitManager
    listen_addresses: _containers.RepeatedScalarFieldContainer[str]
    state_dir: str
    pid: int
    under_systemd: bool
    http_urls: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., hostname: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uptime_seconds: _Optional[float] = ..., unit_manager: _Optional[_Union[UnitManager, str]] = ..., listen_addresses: _Optional[_Iterable[str]] = ..., state_dir: _Optional[str] = ..., pid: _Optional[int] = ..., under_systemd: _Optional[bool] = ..., http_urls: _Optional[_Iterable[str]] = ...) -> None: ...

class DeviceProcess(_message.Message):
    __slots__ = ("pid", "name", "used_memory_bytes")
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    pid: int
    name: str
    used_memory_bytes: int
    def __init__(self, pid: _Optional[int] = ..., name: _Optional[str] = ..., used_memory_bytes: _Optional[int] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("kind", "index", "uuid", "name", "memory_total_bytes", "memory_free_bytes", "processes", "instance")
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    kind: DeviceKind
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    processes: _containers.RepeatedCompositeFieldContainer[DeviceProcess]
    instance: str
    def __init__(self, kind: _Optional[_Union[DeviceKind, str]] = ..., index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., processes: _Optional[_Iterable[_Union[DeviceProcess, _Mapping]]] = ..., instance: _Optional[str] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("kind",)
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: DeviceKind
    def __init__(self, kind: _Optional[_Union[DeviceKind, str]] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices", "gpu_source")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    GPU_SOURCE_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    gpu_source: GpuSource
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., gpu_source: _Optional[_Union[GpuSource, str]] = ...) -> None: ...
