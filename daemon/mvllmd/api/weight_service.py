"""WeightService: translates weight updates, sleep and wake between protos and the domain (weights/)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from mvllm.v1 import weights_pb2 as pb
from mvllm.v1 import weights_pb2_grpc
from mvllmd.api.boundary import rpc, rpc_stream
from mvllmd.api.relay import Relay
from mvllmd.errors import InvalidRequest
from mvllmd.weights.updates import InstanceResult, Step, UpdateReport, UpdateRequest, WeightUpdates

MODES = {pb.UPDATE_MODE_UNSPECIFIED: "keep", pb.UPDATE_MODE_KEEP: "keep", pb.UPDATE_MODE_WAIT: "wait",
         pb.UPDATE_MODE_ABORT: "abort"}  # fmt: skip
STEPS = {
    Step.WAITING: pb.UPDATE_STEP_WAITING,
    Step.PAUSING: pb.UPDATE_STEP_PAUSING,
    Step.RELOADING: pb.UPDATE_STEP_RELOADING,
    Step.RESUMING: pb.UPDATE_STEP_RESUMING,
    Step.DONE: pb.UPDATE_STEP_DONE,
    Step.FAILED: pb.UPDATE_STEP_FAILED,
}


class WeightServicer(weights_pb2_grpc.WeightServiceServicer):  # type: ignore[misc]  # untyped stub base
    """This host's instances' weights; with hosts, those of other fleet hosts too, through `relay`."""

    def __init__(self, weights: WeightUpdates, relay: Relay | None = None) -> None:
        self._weights = weights
        self._relay = relay

    @rpc_stream
    async def UpdateWeights(
        self, request: pb.UpdateWeightsRequest, context: Any
    ) -> AsyncIterator[pb.UpdateWeightsResponse]:
        mode = MODES.get(request.mode, str(request.mode))  # an unknown number: the domain refuses it
        update = UpdateRequest(request.model, request.path, request.version, mode, request.rolling)
        if request.check_only:
            yield report_to_proto(self._weights.check(update))
        elif request.hosts:
            if self._relay is None:
                raise InvalidRequest("this daemon has no fleet of hosts")
            async for merged in self._relay.update_weights(request, _Here(self._weights, update)):
                yield merged
        else:
            async for report in self._weights.update(update):
                yield report_to_proto(report)

    @rpc
    async def SleepInstances(self, request: pb.SleepInstancesRequest, context: Any) -> pb.SleepInstancesResponse:
        results = await self._weights.sleep(request.model, request.level or 1)
        return pb.SleepInstancesResponse(instances=[result_to_proto(r) for r in results])

    @rpc
    async def WakeInstances(self, request: pb.WakeInstancesRequest, context: Any) -> pb.WakeInstancesResponse:
        results = await self._weights.wake(request.model)
        return pb.WakeInstancesResponse(instances=[result_to_proto(r) for r in results])


class _Here:
    """This host's part of a fleet update (api/relay.py)."""

    def __init__(self, weights: WeightUpdates, update: UpdateRequest) -> None:
        self._weights, self._update = weights, update

    async def check(self) -> pb.UpdateWeightsResponse:
        return report_to_proto(self._weights.check(self._update))

    async def run(self) -> AsyncIterator[pb.UpdateWeightsResponse]:
        async for report in self._weights.update(self._update):
            yield report_to_proto(report)


def report_to_proto(report: UpdateReport) -> pb.UpdateWeightsResponse:
    return pb.UpdateWeightsResponse(
        model=report.model,
        version=report.version,
        instances=[
            pb.InstanceUpdate(
                name=i.name,
                step=STEPS[i.step],
                error=i.error,
                old_version=i.old_version,
                version=i.version or i.old_version,
                seconds=i.seconds,
            )
            for i in report.instances
        ],
        done=report.done,
        elapsed_seconds=report.elapsed_s,
    )


def result_to_proto(result: InstanceResult) -> pb.InstanceResult:
    return pb.InstanceResult(name=result.name, ok=result.ok, error=result.error)
