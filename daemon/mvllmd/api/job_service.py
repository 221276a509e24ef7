"""JobService: translates job submissions, listings, watches and cancels between protos and the domain."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from mvllm.v1 import job_pb2 as pb
from mvllm.v1 import job_pb2_grpc
from mvllmd.api.boundary import rpc, rpc_stream
from mvllmd.errors import InvalidRequest
from mvllmd.jobs.dispatch import Policy
from mvllmd.jobs.manager import EndpointView, JobManager, JobView
from mvllmd.jobs.record import JobRequest, JobState
from mvllmd.jobs.requests import Sampling
from mvllmd.jobs.runner import OnError

STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
POLICIES: dict[int, Policy] = {
    pb.POLICY_UNSPECIFIED: "least-loaded",
    pb.POLICY_LEAST_LOADED: "least-loaded",
    pb.POLICY_ROUND_ROBIN: "round-robin",
}
POLICIES_TO_PROTO = {"least-loaded": pb.POLICY_LEAST_LOADED, "round-robin": pb.POLICY_ROUND_ROBIN}
ON_ERROR: dict[int, OnError] = {
    pb.ON_ERROR_UNSPECIFIED: "record",
    pb.ON_ERROR_RECORD: "record",
    pb.ON_ERROR_FAIL: "fail",
}
ON_ERROR_TO_PROTO = {"record": pb.ON_ERROR_RECORD, "fail": pb.ON_ERROR_FAIL}


class JobServicer(job_pb2_grpc.JobServiceServicer):  # type: ignore[misc]  # untyped stub base
    def __init__(self, jobs: JobManager) -> None:
        self._jobs = jobs

    @rpc
    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Any) -> pb.SubmitJobResponse:
        return pb.SubmitJobResponse(job=job_to_proto(await self._jobs.submit(request_from_proto(request.spec))))

    @rpc
    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=job_to_proto(self._jobs.get(request.id)))

    @rpc
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[job_to_proto(v) for v in self._jobs.list_jobs()])

    @rpc
    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=job_to_proto(await self._jobs.cancel(request.id)))

    @rpc_stream
    async def WatchJob(self, request: pb.WatchJobRequest, context: Any) -> AsyncIterator[pb.WatchJobResponse]:
        async for view in self._jobs.watch(request.id):
            yield pb.WatchJobResponse(job=job_to_proto(view))

    @rpc
    async def PruneJobs(self, request: pb.PruneJobsRequest, context: Any) -> pb.PruneJobsResponse:
        ids, parts = self._jobs.prune()
        return pb.PruneJobsResponse(removed_ids=ids, removed_parts=parts)


def request_from_proto(spec: pb.JobSpec) -> JobRequest:
    if spec.policy not in POLICIES:
        raise InvalidRequest(f"unknown policy {spec.policy}")
    if spec.on_error not in ON_ERROR:
        raise InvalidRequest(f"unknown on_error {spec.on_error}")
    return JobRequest(
        input_path=Path(spec.input_path),
        output_path=Path(spec.output_path),
        sampling=sampling_from_proto(spec.model, spec.sampling),
        num_samples=spec.num_samples or 1,
        prompt_column=spec.prompt_column or "prompt",
        policy=POLICIES[spec.policy],
        max_concurrent=spec.max_concurrent,
        endpoints=tuple(spec.endpoints),
        wait_for_instances_s=spec.wait_for_instances_seconds,
        on_error=ON_ERROR[spec.on_error],
        resume=spec.resume,
        overwrite=spec.overwrite,
        endpoint_api_key=spec.endpoint_api_key,
        hedge=not spec.no_hedge,
    )


def sampling_from_proto(model: str, params: pb.SamplingParams) -> Sampling:
    extra: Any = {}
    if params.extra_body_json:
        try:
            extra = json.loads(params.extra_body_json)
        except ValueError as exc:
            raise InvalidRequest(f"--extra-body is not valid JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise InvalidRequest("--extra-body must be a JSON object, e.g. '{\"top_k\": 20}'")
    return Sampling(
        model=model,
        max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
        temperature=params.temperature if params.HasField("temperature") else 1.0,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        stop=tuple(params.stop),
        seed=params.seed if params.HasField("seed") else None,
        logprobs=params.logprobs if params.HasField("logprobs") else None,
        return_token_ids=params.return_token_ids,
        extra_body=extra,
    )


def job_to_proto(view: JobView) -> pb.Job:
    record, request = view.record, view.record.request
    sampling = request.sampling
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
    spec = pb.JobSpec(
        input_path=str(request.input_path),
        output_path=str(request.output_path),
        prompt_column=request.prompt_column,
        num_samples=request.num_samples,
        model=sampling.model,
        sampling=params,
        policy=POLICIES_TO_PROTO[request.policy],
        max_concurrent=request.max_concurrent,
        endpoints=list(request.endpoints),
        wait_for_instances_seconds=request.wait_for_instances_s,
        on_error=ON_ERROR_TO_PROTO[request.on_error],
        resume=request.resume,
        overwrite=request.overwrite,
        no_hedge=not request.hedge,
    )
    return pb.Job(
        id=record.id,
        state=STATES[record.state],
        spec=spec,
        samples_total=record.samples_total,
        samples_done=record.samples_done,
        errors=record.errors,
        output_path=str(request.output_path),
        completion_tokens=record.completion_tokens,
        tokens_per_second=view.tokens_per_s,
        eta_seconds=view.eta_s,
        inflight=view.inflight,
        endpoints=[_endpoint_to_proto(e) for e in view.endpoints],
        message=record.message,
        created_at=_timestamp(record.created_at),
        started_at=_timestamp(record.started_at) if record.started_at else None,
        finished_at=_timestamp(record.finished_at) if record.finished_at else None,
        model=sampling.model,
    )


def _endpoint_to_proto(e: EndpointView) -> pb.EndpointProgress:
    return pb.EndpointProgress(
        url=e.url,
        instance=e.instance,
        inflight=e.inflight,
        completed=e.completed,
        completion_tokens=e.completion_tokens,
        out=e.out,
    )


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
