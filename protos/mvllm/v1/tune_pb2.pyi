from mvllm.v1 import instance_pb2 as _instance_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Fit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIT_UNSPECIFIED: _ClassVar[Fit]
    FIT_FITS: _ClassVar[Fit]
    FIT_TIGHT: _ClassVar[Fit]
    FIT_DOES_NOT_FIT: _ClassVar[Fit]
    FIT_UNKNOWN: _ClassVar[Fit]

class TrialPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRIAL_PHASE_UNSPECIFIED: _ClassVar[TrialPhase]
    TRIAL_PHASE_PLANNED: _ClassVar[TrialPhase]
    TRIAL_PHASE_LAUNCHING: _ClassVar[TrialPhase]
    TRIAL_PHASE_WARMING_UP: _ClassVar[TrialPhase]
    TRIAL_PHASE_MEASURING: _ClassVar[TrialPhase]
    TRIAL_PHASE_STOPPING: _ClassVar[TrialPhase]
    TRIAL_PHASE_DONE: _ClassVar[TrialPhase]
    TRIAL_PHASE_SKIPPED: _ClassVar[TrialPhase]
    TRIAL_PHASE_FAILED: _ClassVar[TrialPhase]

class TuneClock(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TUNE_CLOCK_UNSPECIFIED: _ClassVar[TuneClock]
    TUNE_CLOCK_WALL: _ClassVar[TuneClock]
    TUNE_CLOCK_SIMULATED: _ClassVar[TuneClock]

class TuneStep(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TUNE_STEP_UNSPECIFIED: _ClassVar[TuneStep]
    TUNE_STEP_PLAN: _ClassVar[TuneStep]
    TUNE_STEP_APPLY: _ClassVar[TuneStep]
FIT_UNSPECIFIED: Fit
FIT_FITS: Fit
FIT_TIGHT: Fit
FIT_DOES_NOT_FIT: Fit
FIT_UNKNOWN: Fit
TRIAL_PHASE_UNSPECIFIED: TrialPhase
TRIAL_PHASE_PLANNED: TrialPhase
TRIAL_PHASE_LAUNCHING: TrialPhase
TRIAL_PHASE_WARMING_UP: TrialPhase
TRIAL_PHASE_MEASURING: TrialPhase
TRIAL_PHASE_STOPPING: TrialPhase
TRIAL_PHASE_DONE: TrialPhase
TRIAL_PHASE_SKIPPED: TrialPhase
TRIAL_PHASE_FAILED: TrialPhase
TUNE_CLOCK_UNSPECIFIED: TuneClock
TUNE_CLOCK_WALL: TuneClock
TUNE_CLOCK_SIMULATED: TuneClock
TUNE_STEP_UNSPECIFIED: TuneStep
TUNE_STEP_PLAN: TuneStep
TUNE_STEP_APPLY: TuneStep

class Split(_message.Message):
    __slots__ = ("instances", "tensor_parallel_size")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    instances: int
    tensor_parallel_size: int
    def __init__(self, instances: _Optional[int] = ..., tensor_parallel_size: _Optional[int] = ...) -> None: ...

class FitEstimate(_message.Message):
    __slots__ = ("fit", "weights_bytes", "per_device_bytes", "usable_bytes", "note")
    FIT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PER_DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    fit: Fit
    weights_bytes: int
    per_device_bytes: int
    usable_bytes: int
    note: str
    def __init__(self, fit: _Optional[_Union[Fit, str]] = ..., weights_bytes: _Optional[int] = ..., per_device_bytes: _Optional[int] = ..., usable_bytes: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class Trial(_message.Message):
    __slots__ = ("split", "estimate", "phase", "message", "progress", "tokens_per_second", "samples_per_second", "tokens_per_second_low", "tokens_per_second_high", "interval_tokens_per_second", "measured_seconds", "launch_seconds", "estimated_total_seconds", "speedup", "instances", "fleet_host")
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_LOW_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_HIGH_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MEASURED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAUNCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SPEEDUP_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    FLEET_HOST_FIELD_NUMBER: _ClassVar[int]
    split: Split
    estimate: FitEstimate
    phase: TrialPhase
    message: str
    progress: float
    tokens_per_second: float
    samples_per_second: float
    tokens_per_second_low: float
    tokens_per_second_high: float
    interval_tokens_per_second: _containers.RepeatedScalarFieldContainer[float]
    measured_seconds: float
    launch_seconds: float
    estimated_total_seconds: float
    speedup: float
    instances: _containers.RepeatedScalarFieldContainer[str]
    fleet_host: str
    def __init__(self, split: _Optional[_Union[Split, _Mapping]] = ..., estimate: _Optional[_Union[FitEstimate, _Mapping]] = ..., phase: _Optional[_Union[TrialPhase, str]] = ..., message: _Optional[str] = ..., progress: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., tokens_per_second_low: _Optional[float] = ..., tokens_per_second_high: _Optional[float] = ..., interval_tokens_per_second: _Optional[_Iterable[float]] = ..., measured_seconds: _Optional[float] = ..., launch_seconds: _Optional[float] = ..., estimated_total_seconds: _Optional[float] = ..., speedup: _Optional[float] = ..., instances: _Optional[_Iterable[str]] = ..., fleet_host: _Optional[str] = ...) -> None: ...

class TuneReport(_message.Message):
    __slots__ = ("model", "engine", "devices", "clock", "data_path", "prompts", "num_samples", "max_tokens", "budget_seconds", "trials", "best", "recommendation", "started_at", "ended_at", "complete", "applied_instances", "fleet_hosts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    DATA_PATH_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    FLEET_HOSTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    engine: _instance_pb2.EngineKind
    devices: _containers.RepeatedScalarFieldContainer[str]
    clock: TuneClock
    data_path: str
    prompts: int
    num_samples: int
    max_tokens: int
    budget_seconds: float
    trials: _containers.RepeatedCompositeFieldContainer[Trial]
    best: int
    recommendation: str
    started_at: float
    ended_at: float
    complete: bool
    applied_instances: _containers.RepeatedScalarFieldContainer[str]
    fleet_hosts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., engine: _Optional[_Union[_instance_pb2.EngineKind, str]] = ..., devices: _Optional[_Iterable[str]] = ..., clock: _Optional[_Union[TuneClock, str]] = ..., data_path: _Optional[str] = ..., prompts: _Optional[int] = ..., num_samples: _Optional[int] = ..., max_tokens: _Optional[int] = ..., budget_seconds: _Optional[float] = ..., trials: _Optional[_Iterable[_Union[Trial, _Mapping]]] = ..., best: _Optional[int] = ..., recommendation: _Optional[str] = ..., started_at: _Optional[float] = ..., ended_at: _Optional[float] = ..., complete: _Optional[bool] = ..., applied_instances: _Optional[_Iterable[str]] = ..., fleet_hosts: _Optional[_Iterable[str]] = ...) -> None: ...

class TuneRequest(_message.Message):
    __slots__ = ("model", "engine", "devices", "cpu", "data_path", "prompt_column", "num_samples", "max_tokens", "configs", "budget_seconds", "apply", "force", "engine_args", "env", "max_num_seqs", "hosts", "step")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    DATA_PATH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_COLUMN_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONFIGS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    APPLY_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    model: str
    engine: _instance_pb2.EngineKind
    devices: str
    cpu: bool
    data_path: str
    prompt_column: str
    num_samples: int
    max_tokens: int
    configs: _containers.RepeatedCompositeFieldContainer[Split]
    budget_seconds: float
    apply: bool
    force: bool
    engine_args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    max_num_seqs: int
    hosts: _containers.RepeatedScalarFieldContainer[str]
    step: TuneStep
    def __init__(self, model: _Optional[str] = ..., engine: _Optional[_Union[_instance_pb2.EngineKind, str]] = ..., devices: _Optional[str] = ..., cpu: _Optional[bool] = ..., data_path: _Optional[str] = ..., prompt_column: _Optional[str] = ..., num_samples: _Optional[int] = ..., max_tokens: _Optional[int] = ..., configs: _Optional[_Iterable[_Union[Split, _Mapping]]] = ..., budget_seconds: _Optional[float] = ..., apply: _Optional[bool] = ..., force: _Optional[bool] = ..., engine_args: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., max_num_seqs: _Optional[int] = ..., hosts: _Optional[_Iterable[str]] = ..., step: _Optional[_Union[TuneStep, str]] = ...) -> None: ...

class TuneResponse(_message.Message):
    __slots__ = ("report", "trial")
    REPORT_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    report: TuneReport
    trial: int
    def __init__(self, report: _Optional[_Union[TuneReport, _Mapping]] = ..., trial: _Optional[int] = ...) -> None: ...

class GetLastTuneRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLastTuneResponse(_message.Message):
    __slots__ = ("report",)
    REPORT_FIELD_NUMBER: _ClassVar[int]
    report: TuneReport
    def __init__(self, report: _Optional[_Union[TuneReport, _Mapping]] = ...) -> None: ...
