import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mvllm.v1 import fleet_pb2 as _fleet_pb2
from mvllm.v1 import instance_pb2 as _instance_pb2
from mvllm.v1 import job_pb2 as _job_pb2
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

class GaugeSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GAUGE_SOURCE_UNSPECIFIED: _ClassVar[GaugeSource]
    GAUGE_SOURCE_ENDPOINT_TABLE: _ClassVar[GaugeSource]
    GAUGE_SOURCE_SCRAPED: _ClassVar[GaugeSource]
    GAUGE_SOURCE_NONE: _ClassVar[GaugeSource]
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
GAUGE_SOURCE_UNSPECIFIED: GaugeSource
GAUGE_SOURCE_ENDPOINT_TABLE: GaugeSource
GAUGE_SOURCE_SCRAPED: GaugeSource
GAUGE_SOURCE_NONE: GaugeSource

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
    __slots__ = ("kind", "index", "uuid", "name", "memory_total_bytes", "memory_free_bytes", "processes", "instance", "fleet_host")
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    FLEET_HOST_FIELD_NUMBER: _ClassVar[int]
    kind: DeviceKind
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    processes: _containers.RepeatedCompositeFieldContainer[DeviceProcess]
    instance: str
    fleet_host: str
    def __init__(self, kind: _Optional[_Union[DeviceKind, str]] = ..., index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., processes: _Optional[_Iterable[_Union[DeviceProcess, _Mapping]]] = ..., instance: _Optional[str] = ..., fleet_host: _Optional[str] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("kind", "hosts")
    KIND_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    kind: DeviceKind
    hosts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[_Union[DeviceKind, str]] = ..., hosts: _Optional[_Iterable[str]] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices", "gpu_source", "failures")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    GPU_SOURCE_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    gpu_source: GpuSource
    failures: _containers.RepeatedCompositeFieldContainer[_fleet_pb2.HostFailure]
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., gpu_source: _Optional[_Union[GpuSource, str]] = ..., failures: _Optional[_Iterable[_Union[_fleet_pb2.HostFailure, _Mapping]]] = ...) -> None: ...

class GetOverviewRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetOverviewResponse(_message.Message):
    __slots__ = ("taken_at", "uptime_seconds", "version", "hostname", "gpus", "gpu_source", "servers", "jobs", "front_door")
    TAKEN_AT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    GPU_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    FRONT_DOOR_FIELD_NUMBER: _ClassVar[int]
    taken_at: _timestamp_pb2.Timestamp
    uptime_seconds: float
    version: str
    hostname: str
    gpus: _containers.RepeatedCompositeFieldContainer[OverviewGpu]
    gpu_source: GpuSource
    servers: _containers.RepeatedCompositeFieldContainer[OverviewServer]
    jobs: _containers.RepeatedCompositeFieldContainer[OverviewJob]
    front_door: OverviewFrontDoor
    def __init__(self, taken_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uptime_seconds: _Optional[float] = ..., version: _Optional[str] = ..., hostname: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[OverviewGpu, _Mapping]]] = ..., gpu_source: _Optional[_Union[GpuSource, str]] = ..., servers: _Optional[_Iterable[_Union[OverviewServer, _Mapping]]] = ..., jobs: _Optional[_Iterable[_Union[OverviewJob, _Mapping]]] = ..., front_door: _Optional[_Union[OverviewFrontDoor, _Mapping]] = ...) -> None: ...

class OverviewGpu(_message.Message):
    __slots__ = ("kind", "index", "uuid", "name", "utilization", "memory_used_bytes", "memory_total_bytes", "instances")
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    kind: DeviceKind
    index: int
    uuid: str
    name: str
    utilization: float
    memory_used_bytes: int
    memory_total_bytes: int
    instances: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[_Union[DeviceKind, str]] = ..., index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., utilization: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., instances: _Optional[_Iterable[str]] = ...) -> None: ...

class OverviewServer(_message.Message):
    __slots__ = ("name", "engine", "state", "url", "model", "running", "waiting", "tokens_per_second", "gauges", "max_num_seqs", "inflight", "door_inflight", "devices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    GAUGES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    DOOR_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    engine: str
    state: _instance_pb2.InstanceState
    url: str
    model: str
    running: int
    waiting: int
    tokens_per_second: float
    gauges: GaugeSource
    max_num_seqs: int
    inflight: int
    door_inflight: int
    devices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., engine: _Optional[str] = ..., state: _Optional[_Union[_instance_pb2.InstanceState, str]] = ..., url: _Optional[str] = ..., model: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., gauges: _Optional[_Union[GaugeSource, str]] = ..., max_num_seqs: _Optional[int] = ..., inflight: _Optional[int] = ..., door_inflight: _Optional[int] = ..., devices: _Optional[_Iterable[str]] = ...) -> None: ...

class OverviewJob(_message.Message):
    __slots__ = ("id", "state", "model", "samples_total", "samples_done", "errors", "completion_tokens", "samples_per_second", "tokens_per_second", "eta_seconds", "inflight", "output_path", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_DONE_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: _job_pb2.JobState
    model: str
    samples_total: int
    samples_done: int
    errors: int
    completion_tokens: int
    samples_per_second: float
    tokens_per_second: float
    eta_seconds: float
    inflight: int
    output_path: str
    message: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ..., model: _Optional[str] = ..., samples_total: _Optional[int] = ..., samples_done: _Optional[int] = ..., errors: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., samples_per_second: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., inflight: _Optional[int] = ..., output_path: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StatusCount(_message.Message):
    __slots__ = ("status", "requests")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    status: int
    requests: int
    def __init__(self, status: _Optional[int] = ..., requests: _Optional[int] = ...) -> None: ...

class OverviewFrontDoor(_message.Message):
    __slots__ = ("urls", "requests_total", "errors_total", "statuses", "retries_total", "continued_streams_total", "stream_errors_total", "inflight")
    URLS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERRORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    RETRIES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CONTINUED_STREAMS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STREAM_ERRORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    urls: _containers.RepeatedScalarFieldContainer[str]
    requests_total: int
    errors_total: int
    statuses: _containers.RepeatedCompositeFieldContainer[StatusCount]
    retries_total: int
    continued_streams_total: int
    stream_errors_total: int
    inflight: int
    def __init__(self, urls: _Optional[_Iterable[str]] = ..., requests_total: _Optional[int] = ..., errors_total: _Optional[int] = ..., statuses: _Optional[_Iterable[_Union[StatusCount, _Mapping]]] = ..., retries_total: _Optional[int] = ..., continued_streams_total: _Optional[int] = ..., stream_errors_total: _Optional[int] = ..., inflight: _Optional[int] = ...) -> None: ...
