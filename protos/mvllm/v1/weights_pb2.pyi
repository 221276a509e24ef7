from mvllm.v1 import fleet_pb2 as _fleet_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpdateMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_MODE_UNSPECIFIED: _ClassVar[UpdateMode]
    UPDATE_MODE_KEEP: _ClassVar[UpdateMode]
    UPDATE_MODE_WAIT: _ClassVar[UpdateMode]
    UPDATE_MODE_ABORT: _ClassVar[UpdateMode]

class UpdateStep(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_STEP_UNSPECIFIED: _ClassVar[UpdateStep]
    UPDATE_STEP_WAITING: _ClassVar[UpdateStep]
    UPDATE_STEP_PAUSING: _ClassVar[UpdateStep]
    UPDATE_STEP_RELOADING: _ClassVar[UpdateStep]
    UPDATE_STEP_RESUMING: _ClassVar[UpdateStep]
    UPDATE_STEP_DONE: _ClassVar[UpdateStep]
    UPDATE_STEP_FAILED: _ClassVar[UpdateStep]
UPDATE_MODE_UNSPECIFIED: UpdateMode
UPDATE_MODE_KEEP: UpdateMode
UPDATE_MODE_WAIT: UpdateMode
UPDATE_MODE_ABORT: UpdateMode
UPDATE_STEP_UNSPECIFIED: UpdateStep
UPDATE_STEP_WAITING: UpdateStep
UPDATE_STEP_PAUSING: UpdateStep
UPDATE_STEP_RELOADING: UpdateStep
UPDATE_STEP_RESUMING: UpdateStep
UPDATE_STEP_DONE: UpdateStep
UPDATE_STEP_FAILED: UpdateStep

class UpdateWeightsRequest(_message.Message):
    __slots__ = ("model", "path", "version", "mode", "rolling", "hosts", "check_only")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ROLLING_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    CHECK_ONLY_FIELD_NUMBER: _ClassVar[int]
    model: str
    path: str
    version: str
    mode: UpdateMode
    rolling: bool
    hosts: _containers.RepeatedScalarFieldContainer[str]
    check_only: bool
    def __init__(self, model: _Optional[str] = ..., path: _Optional[str] = ..., version: _Optional[str] = ..., mode: _Optional[_Union[UpdateMode, str]] = ..., rolling: _Optional[bool] = ..., hosts: _Optional[_Iterable[str]] = ..., check_only: _Optional[bool] = ...) -> None: ...

class InstanceUpdate(_message.Message):
    __slots__ = ("name", "step", "error", "old_version", "version", "seconds", "fleet_host")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    FLEET_HOST_FIELD_NUMBER: _ClassVar[int]
    name: str
    step: UpdateStep
    error: str
    old_version: str
    version: str
    seconds: float
    fleet_host: str
    def __init__(self, name: _Optional[str] = ..., step: _Optional[_Union[UpdateStep, str]] = ..., error: _Optional[str] = ..., old_version: _Optional[str] = ..., version: _Optional[str] = ..., seconds: _Optional[float] = ..., fleet_host: _Optional[str] = ...) -> None: ...

class UpdateWeightsResponse(_message.Message):
    __slots__ = ("model", "version", "instances", "done", "elapsed_seconds", "failures")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    instances: _containers.RepeatedCompositeFieldContainer[InstanceUpdate]
    done: bool
    elapsed_seconds: float
    failures: _containers.RepeatedCompositeFieldContainer[_fleet_pb2.HostFailure]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., instances: _Optional[_Iterable[_Union[InstanceUpdate, _Mapping]]] = ..., done: _Optional[bool] = ..., elapsed_seconds: _Optional[float] = ..., failures: _Optional[_Iterable[_Union[_fleet_pb2.HostFailure, _Mapping]]] = ...) -> None: ...

class SleepInstancesRequest(_message.Message):
    __slots__ = ("model", "level")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    level: int
    def __init__(self, model: _Optional[str] = ..., level: _Optional[int] = ...) -> None: ...

class InstanceResult(_message.Message):
    __slots__ = ("name", "ok", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    ok: bool
    error: str
    def __init__(self, name: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class SleepInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceResult]
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceResult, _Mapping]]] = ...) -> None: ...

class WakeInstancesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class WakeInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceResult]
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceResult, _Mapping]]] = ...) -> None: ...
