import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class Policy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_UNSPECIFIED: _ClassVar[Policy]
    POLICY_LEAST_LOADED: _ClassVar[Policy]
    POLICY_ROUND_ROBIN: _ClassVar[Policy]

class OnError(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_ERROR_UNSPECIFIED: _ClassVar[OnError]
    ON_ERROR_RECORD: _ClassVar[OnError]
    ON_ERROR_FAIL: _ClassVar[OnError]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
POLICY_UNSPECIFIED: Policy
POLICY_LEAST_LOADED: Policy
POLICY_ROUND_ROBIN: Policy
ON_ERROR_UNSPECIFIED: OnError
ON_ERROR_RECORD: OnError
ON_ERROR_FAIL: OnError

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "stop", "seed", "logprobs", "return_token_ids", "extra_body_json")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_BODY_JSON_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    logprobs: int
    return_token_ids: bool
    extra_body_json: str
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., logprobs: _Optional[int] = ..., return_token_ids: _Optional[bool] = ..., extra_body_json: _Optional[str] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("input_path", "output_path", "prompt_column", "num_samples", "model", "sampling", "policy", "max_concurrent", "endpoints", "wait_for_instances_seconds", "on_error", "resume", "overwrite", "endpoint_api_key", "no_hedge", "weight_version", "shard_index", "shard_count")
    INPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_COLUMN_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_INSTANCES_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ON_ERROR_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_API_KEY_FIELD_NUMBER: _ClassVar[int]
    NO_HEDGE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    input_path: str
    output_path: str
    prompt_column: str
    num_samples: int
    model: str
    sampling: SamplingParams
    policy: Policy
    max_concurrent: int
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    wait_for_instances_seconds: float
    on_error: OnError
    resume: bool
    overwrite: bool
    endpoint_api_key: str
    no_hedge: bool
    weight_version: str
    shard_index: int
    shard_count: int
    def __init__(self, input_path: _Optional[str] = ..., output_path: _Optional[str] = ..., prompt_column: _Optional[str] = ..., num_samples: _Optional[int] = ..., model: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., policy: _Optional[_Union[Policy, str]] = ..., max_concurrent: _Optional[int] = ..., endpoints: _Optional[_Iterable[str]] = ..., wait_for_instances_seconds: _Optional[float] = ..., on_error: _Optional[_Union[OnError, str]] = ..., resume: _Optional[bool] = ..., overwrite: _Optional[bool] = ..., endpoint_api_key: _Optional[str] = ..., no_hedge: _Optional[bool] = ..., weight_version: _Optional[str] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ...) -> None: ...

class EndpointProgress(_message.Message):
    __slots__ = ("url", "instance", "inflight", "completed", "completion_tokens", "out")
    URL_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    url: str
    instance: str
    inflight: int
    completed: int
    completion_tokens: int
    out: bool
    def __init__(self, url: _Optional[str] = ..., instance: _Optional[str] = ..., inflight: _Optional[int] = ..., completed: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., out: _Optional[bool] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "spec", "samples_total", "samples_done", "errors", "output_path", "completion_tokens", "tokens_per_second", "eta_seconds", "inflight", "endpoints", "message", "created_at", "started_at", "finished_at", "model", "moved_requests")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_DONE_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MOVED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    spec: JobSpec
    samples_total: int
    samples_done: int
    errors: int
    output_path: str
    completion_tokens: int
    tokens_per_second: float
    eta_seconds: float
    inflight: int
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointProgress]
    message: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    model: str
    moved_requests: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., samples_total: _Optional[int] = ..., samples_done: _Optional[int] = ..., errors: _Optional[int] = ..., output_path: _Optional[str] = ..., completion_tokens: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., inflight: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[EndpointProgress, _Mapping]]] = ..., message: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ..., moved_requests: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class PruneJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PruneJobsResponse(_message.Message):
    __slots__ = ("removed_ids", "removed_parts")
    REMOVED_IDS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_PARTS_FIELD_NUMBER: _ClassVar[int]
    removed_ids: _containers.RepeatedScalarFieldContainer[str]
    removed_parts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, removed_ids: _Optional[_Iterable[str]] = ..., removed_parts: _Optional[_Iterable[str]] = ...) -> None: ...
