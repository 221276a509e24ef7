"""JobService: translates job submissions, listings, watches and cancels between protos and the domain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from mvllm.convert import spec_from_proto, spec_to_proto, state_to_proto
from mvllm.v1 import job_pb2 as pb
from mvllm.v1 import job_pb2_grpc
from mvllmd.api.boundary import rpc, rpc_stream
from mvllmd.jobs.manager import JobManager, JobView
from mvllmd.jobs.run import LaneView


class JobServicer(job_pb2_grpc.JobServiceServicer):  # type: ignore[misc]  # untyped stub base
    def __init__(self, jobs: JobManager) -> None:
        self._jobs = jobs

    @rpc
    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Any) -> pb.SubmitJobResponse:
        return pb.SubmitJobResponse(job=job_to_proto(await self._jobs.submit(spec_from_proto(request.spec))))

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


def job_to_proto(view: JobView) -> pb.Job:
    record, spec = view.record, view.record.spec
    return pb.Job(
        id=record.id,
        state=state_to_proto(record.state),
        spec=spec_to_proto(spec),  # without the endpoints' API key
        samples_total=record.samples_total,
        samples_done=record.samples_done,
        errors=record.errors,
        output_path=str(spec.output_path),
        completion_tokens=record.completion_tokens,
        tokens_per_second=view.tokens_per_s,
        eta_seconds=view.eta_s,
        inflight=view.inflight,
        endpoints=[_endpoint_to_proto(e) for e in view.endpoints],
        message=record.message,
        created_at=_timestamp(record.created_at),
        started_at=_timestamp(record.started_at) if record.started_at else None,
        finished_at=_timestamp(record.finished_at) if record.finished_at else None,
        model=spec.model,
        moved_requests=view.moves,
    )


def _endpoint_to_proto(e: LaneView) -> pb.EndpointProgress:
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
