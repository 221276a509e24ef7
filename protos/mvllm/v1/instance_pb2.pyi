import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mvllm.v1 import fleet_pb2 as _fleet_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_STATE_UNSPECIFIED: _ClassVar[InstanceState]
    INSTANCE_STATE_STARTING: _ClassVar[InstanceState]
    INSTANCE_STATE_READY: _ClassVar[InstanceState]
    INSTANCE_STATE_UNHEALTHY: _ClassVar[InstanceState]
    INSTANCE_STATE_RESTARTING: _ClassVar[InstanceState]
    INSTANCE_STATE_FAILED: _ClassVar[InstanceState]
    INSTANCE_STATE_STOPPED: _ClassVar[InstanceState]

class EngineKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENGINE_KIND_UNSPECIFIED: _ClassVar[EngineKind]
    ENGINE_KIND_VLLM: _ClassVar[EngineKind]
    ENGINE_KIND_SIM: _ClassVar[EngineKind]
INSTANCE_STATE_UNSPECIFIED: InstanceState
INSTANCE_STATE_STARTING: InstanceState
INSTANCE_STATE_READY: InstanceState
INSTANCE_STATE_UNHEALTHY: InstanceState
INSTANCE_STATE_RESTARTING: InstanceState
INSTANCE_STATE_FAILED: InstanceState
INSTANCE_STATE_STOPPED: InstanceState
ENGINE_KIND_UNSPECIFIED: EngineKind
ENGINE_KIND_VLLM: EngineKind
ENGINE_KIND_SIM: EngineKind

class Instance(_message.Message):
    __slots__ = ("name", "state", "url", "model", "engine", "devices", "port", "host", "tensor_parallel_size", "pid", "max_num_seqs", "restarts", "message", "unit", "state_since", "ready_after_seconds", "weight_updates", "weight_version", "weights_path", "sleep_level", "fleet_host", "trial")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    STATE_SINCE_FIELD_NUMBER: _ClassVar[int]
    READY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_UPDATES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_PATH_FIELD_NUMBER: _ClassVar[int]
    SLEEP_LEVEL_FIELD_NUMBER: _ClassVar[int]
    FLEET_HOST_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: InstanceState
    url: str
    model: str
    engine: EngineKind
    devices: _containers.RepeatedScalarFieldContainer[str]
    port: int
    host: str
    tensor_parallel_size: int
    pid: int
    max_num_seqs: int
    restarts: int
    message: str
    unit: str
    state_since: _timestamp_pb2.Timestamp
    ready_after_seconds: float
    weight_updates: bool
    weight_version: str
    weights_path: str
    sleep_level: int
    fleet_host: str
    trial: bool
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[InstanceState, str]] = ..., url: _Optional[str] = ..., model: _Optional[str] = ..., engine: _Optional[_Union[EngineKind, str]] = ..., devices: _Optional[_Iterable[str]] = ..., port: _Optional[int] = ..., host: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ..., pid: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., restarts: _Optional[int] = ..., message: _Optional[str] = ..., unit: _Optional[str] = ..., state_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ready_after_seconds: _Optional[float] = ..., weight_updates: _Optional[bool] = ..., weight_version: _Optional[str] = ..., weights_path: _Optional[str] = ..., sleep_level: _Optional[int] = ..., fleet_host: _Optional[str] = ..., trial: _Optional[bool] = ...) -> None: ...

class LaunchInstancesRequest(_message.Message):
    __slots__ = ("model", "count", "tensor_parallel_size", "engine", "devices", "port_base", "host", "env", "engine_args", "name_prefix", "api_key", "force", "cpu", "max_num_seqs", "weight_updates", "hosts", "spread", "check_only")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    PORT_BASE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ARGS_FIELD_NUMBER: _ClassVar[int]
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_UPDATES_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    CHECK_ONLY_FIELD_NUMBER: _ClassVar[int]
    model: str
    count: int
    tensor_parallel_size: int
    engine: EngineKind
    devices: str
    port_base: int
    host: str
    env: _containers.ScalarMap[str, str]
    engine_args: _containers.RepeatedScalarFieldContainer[str]
    name_prefix: str
    api_key: str
    force: bool
    cpu: bool
    max_num_seqs: int
    weight_updates: bool
    hosts: _containers.RepeatedScalarFieldContainer[str]
    spread: bool
    check_only: bool
    def __init__(self, model: _Optional[str] = ..., count: _Optional[int] = ..., tensor_parallel_size: _Optional[int] = ..., engine: _Optional[_Union[EngineKind, str]] = ..., devices: _Optional[str] = ..., port_base: _Optional[int] = ..., host: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., engine_args: _Optional[_Iterable[str]] = ..., name_prefix: _Optional[str] = ..., api_key: _Optional[str] = ..., force: _Optional[bool] = ..., cpu: _Optional[bool] = ..., max_num_seqs: _Optional[int] = ..., weight_updates: _Optional[bool] = ..., hosts: _Optional[_Iterable[str]] = ..., spread: _Optional[bool] = ..., check_only: _Optional[bool] = ...) -> None: ...

class LaunchInstancesResponse(_message.Message):
    __slots__ = ("instances", "room", "failures")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    ROOM_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    room: int
    failures: _containers.RepeatedCompositeFieldContainer[_fleet_pb2.HostFailure]
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., room: _Optional[int] = ..., failures: _Optional[_Iterable[_Union[_fleet_pb2.HostFailure, _Mapping]]] = ...) -> None: ...

class StopInstancesRequest(_message.Message):
    __slots__ = ("names", "all", "force", "hosts")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    force: bool
    hosts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ..., force: _Optional[bool] = ..., hosts: _Optional[_Iterable[str]] = ...) -> None: ...

class StopInstancesResponse(_message.Message):
    __slots__ = ("instances", "failures")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    failures: _containers.RepeatedCompositeFieldContainer[_fleet_pb2.HostFailure]
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[_fleet_pb2.HostFailure, _Mapping]]] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ("hosts",)
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, hosts: _Optional[_Iterable[str]] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances", "external_servers", "failures")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_SERVERS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    external_servers: _containers.RepeatedCompositeFieldContainer[ExternalServer]
    failures: _containers.RepeatedCompositeFieldContainer[_fleet_pb2.HostFailure]
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., external_servers: _Optional[_Iterable[_Union[ExternalServer, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[_fleet_pb2.HostFailure, _Mapping]]] = ...) -> None: ...

class WatchInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchInstancesResponse(_message.Message):
    __slots__ = ("instances", "changed")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    changed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., changed: _Optional[_Iterable[str]] = ...) -> None: ...

class GetInstanceLogsRequest(_message.Message):
    __slots__ = ("name", "follow", "tail_lines")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    name: str
    follow: bool
    tail_lines: int
    def __init__(self, name: _Optional[str] = ..., follow: _Optional[bool] = ..., tail_lines: _Optional[int] = ...) -> None: ...

class GetInstanceLogsResponse(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lines: _Optional[_Iterable[str]] = ...) -> None: ...

class ExternalServer(_message.Message):
    __slots__ = ("name", "state", "url", "model", "has_api_key", "max_num_seqs", "message", "state_since", "attached_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HAS_API_KEY_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_SINCE_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: InstanceState
    url: str
    model: str
    has_api_key: bool
    max_num_seqs: int
    message: str
    state_since: _timestamp_pb2.Timestamp
    attached_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[InstanceState, str]] = ..., url: _Optional[str] = ..., model: _Optional[str] = ..., has_api_key: _Optional[bool] = ..., max_num_seqs: _Optional[int] = ..., message: _Optional[str] = ..., state_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attached_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AttachServerRequest(_message.Message):
    __slots__ = ("url", "model", "name", "api_key", "max_num_seqs")
    URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    url: str
    model: str
    name: str
    api_key: str
    max_num_seqs: int
    def __init__(self, url: _Optional[str] = ..., model: _Optional[str] = ..., name: _Optional[str] = ..., api_key: _Optional[str] = ..., max_num_seqs: _Optional[int] = ...) -> None: ...

class AttachServerResponse(_message.Message):
    __slots__ = ("server",)
    SERVER_FIELD_NUMBER: _ClassVar[int]
    server: ExternalServer
    def __init__(self, server: _Optional[_Union[ExternalServer, _Mapping]] = ...) -> None: ...

class DetachServerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DetachServerResponse(_message.Message):
    __slots__ = ("server",)
    SERVER_FIELD_NUMBER: _ClassVar[int]
    server: ExternalServer
    def __init__(self, server: _Optional[_Union[ExternalServer, _Mapping]] = ...) -> None: ...
