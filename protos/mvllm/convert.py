"""The job model (mvllm.jobs) to and from the API's messages (mvllm.v1.job_pb2), one function each way.

The only place where the API's enumerations meet the model's: mvllmctl converts the spec it built
from its flags to submit it, mvllmd's JobService converts what it receives. Unset proto fields take
the model's defaults (num_samples 1, prompt_column "prompt", least-loaded, on-error record).
"""

from __future__ import annotations

import json
from pathlib import Path

from mvllm.jobs import InvalidSpec, JobSpec, JobState, OnError, Policy, Sampling, extra_body_from_json
from mvllm.v1 import job_pb2 as pb

POLICIES = {Policy.LEAST_LOADED: pb.POLICY_LEAST_LOADED, Policy.ROUND_ROBIN: pb.POLICY_ROUND_ROBIN}
ON_ERRORS = {OnError.RECORD: pb.ON_ERROR_RECORD, OnError.FAIL: pb.ON_ERROR_FAIL}
STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
_POLICY_OF = {v: k for k, v in POLICIES.items()} | {pb.POLICY_UNSPECIFIED: Policy.LEAST_LOADED}
_ON_ERROR_OF = {v: k for k, v in ON_ERRORS.items()} | {pb.ON_ERROR_UNSPECIFIED: OnError.RECORD}
_STATE_OF: dict[int, JobState] = {v: k for k, v in STATES.items()}


def spec_from_proto(spec: pb.JobSpec) -> JobSpec:
    """The model of a received spec; InvalidSpec for what cannot be read (validate() checks the rest)."""
    if spec.policy not in _POLICY_OF:
        raise InvalidSpec(f"unknown policy {spec.policy}")
    if spec.on_error not in _ON_ERROR_OF:
        raise InvalidSpec(f"unknown on_error {spec.on_error}")
    return JobSpec(
        input_path=Path(spec.input_path),
        output_path=Path(spec.output_path),
        prompt_column=spec.prompt_column or "prompt",
        num_samples=spec.num_samples or 1,
        model=spec.model,
        sampling=_sampling_from_proto(spec.sampling),
        policy=_POLICY_OF[spec.policy],
        max_concurrent=spec.max_concurrent,
        endpoints=tuple(spec.endpoints),
        wait_for_instances_s=spec.wait_for_instances_seconds,
        on_error=_ON_ERROR_OF[spec.on_error],
        resume=spec.resume,
        overwrite=spec.overwrite,
        endpoint_api_key=spec.endpoint_api_key,
        hedge=not spec.no_hedge,
        weight_version=spec.weight_version,
        shard_index=spec.shard_index,
        shard_count=spec.shard_count or 1,
    )


def spec_to_proto(spec: JobSpec, *, with_api_key: bool = False) -> pb.JobSpec:
    """The API's form of a spec. The endpoints' API key only `with_api_key` (a submit): never shown back."""
    sampling = spec.sampling
    params = pb.SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop=list(sampling.stop),
        seed=sampling.seed,
        logprobs=sampling.logprobs,
        return_token_ids=sampling.return_token_ids,
        extra_body_json=json.dumps(sampling.extra_body) if sampling.extra_body else "",
    )
    return pb.JobSpec(
        input_path=str(spec.input_path),
        output_path=str(spec.output_path),
        prompt_column=spec.prompt_column,
        num_samples=spec.num_samples,
        model=spec.model,
        sampling=params,
        policy=POLICIES[Policy(spec.policy)],
        max_concurrent=spec.max_concurrent,
        endpoints=list(spec.endpoints),
        wait_for_instances_seconds=spec.wait_for_instances_s,
        on_error=ON_ERRORS[OnError(spec.on_error)],
        resume=spec.resume,
        overwrite=spec.overwrite,
        endpoint_api_key=spec.endpoint_api_key if with_api_key else "",
        no_hedge=not spec.hedge,
        weight_version=spec.weight_version,
        shard_index=spec.shard_index,
        shard_count=spec.shard_count,
    )


def state_to_proto(state: JobState) -> pb.JobState:
    return STATES[state]


def state_from_proto(state: int) -> JobState | None:
    """None for JOB_STATE_UNSPECIFIED (or a state this release does not know)."""
    return _STATE_OF.get(state)


def _sampling_from_proto(params: pb.SamplingParams) -> Sampling:
    return Sampling(
        max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
        temperature=params.temperature if params.HasField("temperature") else 1.0,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        stop=tuple(params.stop),
        seed=params.seed if params.HasField("seed") else None,
        logprobs=params.logprobs if params.HasField("logprobs") else None,
        return_token_ids=params.return_token_ids,
        extra_body=extra_body_from_json(params.extra_body_json),
    )
