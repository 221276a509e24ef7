"""TuneService: translates a tune sweep's request and reports between protos and the domain (tune/). A
sweep over fleet hosts is the domain's too (tune/shared.py); a peer's part of it is that peer's
TuneService, called through the relay (_Peer)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from mvllm.v1 import tune_pb2 as pb
from mvllm.v1 import tune_pb2_grpc
from mvllmd.api.boundary import rpc, rpc_stream
from mvllmd.api.instance_service import ENGINES, ENGINES_BY_PROTO
from mvllmd.api.relay import RELAY_TIMEOUT_S, Relay
from mvllmd.errors import InvalidRequest, Unreachable
from mvllmd.hosts.link import PeerLink
from mvllmd.instances.spec import EngineKind
from mvllmd.tune.fit import Estimate, Fit
from mvllmd.tune.measure import Figure
from mvllmd.tune.report import Phase, Report, TrialState
from mvllmd.tune.shared import Update
from mvllmd.tune.splits import Split
from mvllmd.tune.sweep import Tuner, TuneRequest

FITS = {Fit.FITS: pb.FIT_FITS, Fit.TIGHT: pb.FIT_TIGHT, Fit.DOES_NOT_FIT: pb.FIT_DOES_NOT_FIT,
        Fit.UNKNOWN: pb.FIT_UNKNOWN}  # fmt: skip
PHASES = {
    Phase.PLANNED: pb.TRIAL_PHASE_PLANNED,
    Phase.LAUNCHING: pb.TRIAL_PHASE_LAUNCHING,
    Phase.WARMING_UP: pb.TRIAL_PHASE_WARMING_UP,
    Phase.MEASURING: pb.TRIAL_PHASE_MEASURING,
    Phase.STOPPING: pb.TRIAL_PHASE_STOPPING,
    Phase.DONE: pb.TRIAL_PHASE_DONE,
    Phase.SKIPPED: pb.TRIAL_PHASE_SKIPPED,
    Phase.FAILED: pb.TRIAL_PHASE_FAILED,
}
FITS_BY_PROTO = {v: k for k, v in FITS.items()}
PHASES_BY_PROTO = {v: k for k, v in PHASES.items()}
DEFAULT_MAX_TOKENS = 256
DEFAULT_BUDGET_S = 600.0


class TuneServicer(tune_pb2_grpc.TuneServiceServicer):  # type: ignore[misc]  # untyped stub base
    def __init__(self, tuner: Tuner, relay: Relay | None = None) -> None:
        self._tuner = tuner
        self._relay = relay

    @rpc_stream
    async def Tune(self, request: pb.TuneRequest, context: Any) -> AsyncIterator[pb.TuneResponse]:
        wanted = request_from_proto(request)
        if request.step == pb.TUNE_STEP_PLAN:
            yield pb.TuneResponse(report=report_to_proto(await self._tuner.plan(wanted)), trial=-1)
            return
        if request.step == pb.TUNE_STEP_APPLY:
            if len(wanted.configs) != 1:
                raise InvalidRequest("TUNE_STEP_APPLY launches one split: give it as the only entry of configs")
            applied = await self._tuner.apply(wanted, wanted.configs[0])
            yield pb.TuneResponse(report=pb.TuneReport(model=wanted.model, trials=[_trial(None, applied)]), trial=0)
            return
        async for report, trial in self._updates(request, wanted):
            yield pb.TuneResponse(report=report_to_proto(report), trial=trial)

    def _updates(self, request: pb.TuneRequest, wanted: TuneRequest) -> AsyncIterator[Update]:
        """This host's sweep, or one shared among the fleet hosts the request names."""
        if not request.hosts:
            return self._tuner.tune(wanted)
        if self._relay is None:
            raise InvalidRequest("this daemon has no fleet of hosts")
        mine, links = self._relay.chosen(request.hosts)
        if not links:
            return self._tuner.tune(wanted)
        here = [self._tuner.here(wanted, self._relay.name)] if mine else []
        return self._tuner.shared([*here, *(_Peer(self._relay, link, request) for link in links)], wanted.apply)

    @rpc
    async def GetLastTune(self, request: pb.GetLastTuneRequest, context: Any) -> pb.GetLastTuneResponse:
        report = self._tuner.last()
        return pb.GetLastTuneResponse(report=report_to_proto(report) if report is not None else None)


def request_from_proto(request: pb.TuneRequest) -> TuneRequest:
    return TuneRequest(
        model=request.model,
        engine=ENGINES_BY_PROTO.get(request.engine, EngineKind.VLLM),
        devices=request.devices,
        cpu=request.cpu,
        data_path=request.data_path,
        prompt_column=request.prompt_column,
        num_samples=request.num_samples or 1,
        max_tokens=request.max_tokens or DEFAULT_MAX_TOKENS,
        configs=tuple(Split(c.instances, c.tensor_parallel_size) for c in request.configs),
        budget_s=request.budget_seconds or DEFAULT_BUDGET_S,
        apply=request.apply,
        force=request.force,
        engine_args=tuple(request.engine_args),
        env=dict(request.env),
        max_num_seqs=request.max_num_seqs,
    )


def report_to_proto(report: Report) -> pb.TuneReport:
    return pb.TuneReport(
        model=report.model,
        engine=ENGINES[EngineKind(report.engine)],
        devices=report.devices,
        clock=pb.TUNE_CLOCK_SIMULATED if report.simulated else pb.TUNE_CLOCK_WALL,
        data_path=report.data_path,
        prompts=report.rows,
        num_samples=report.num_samples,
        max_tokens=report.max_tokens,
        budget_seconds=report.budget_s,
        trials=[_trial(report, t) for t in report.trials],
        best=report.best,
        recommendation=report.recommendation,
        started_at=report.started_at,
        ended_at=report.ended_at,
        complete=report.complete,
        applied_instances=report.applied,
        fleet_hosts=report.hosts,
    )


def _trial(report: Report | None, trial: TrialState) -> pb.Trial:
    figure = trial.figure
    return pb.Trial(
        split=pb.Split(instances=trial.split.instances, tensor_parallel_size=trial.split.tp),
        estimate=_estimate(trial),
        phase=PHASES[trial.phase],
        message=trial.message,
        progress=trial.progress,
        tokens_per_second=figure.tokens_per_s if figure else 0.0,
        samples_per_second=figure.samples_per_s if figure else 0.0,
        tokens_per_second_low=figure.low if figure else 0.0,
        tokens_per_second_high=figure.high if figure else 0.0,
        interval_tokens_per_second=list(figure.intervals) if figure else [],
        measured_seconds=trial.measured_s,
        launch_seconds=trial.launch_s,
        estimated_total_seconds=report.total_s(trial) if report else 0.0,
        speedup=report.speedup(trial) if report else 0.0,
        instances=trial.instances,
        fleet_host=trial.host,
    )


def _estimate(trial: TrialState) -> pb.FitEstimate:
    e = trial.estimate
    return pb.FitEstimate(fit=FITS[e.fit], weights_bytes=e.weights_bytes, per_device_bytes=e.per_device_bytes,
                          usable_bytes=e.usable_bytes, note=e.note)  # fmt: skip


def report_from_proto(report: pb.TuneReport) -> Report:
    """A peer's report (its part of a shared sweep), as the domain's."""
    return Report(
        model=report.model,
        engine=str(ENGINES_BY_PROTO.get(report.engine, EngineKind.VLLM)),
        devices=list(report.devices),
        data_path=report.data_path,
        rows=report.prompts,
        num_samples=report.num_samples,
        max_tokens=report.max_tokens,
        budget_s=report.budget_seconds,
        trials=[trial_from_proto(t) for t in report.trials],
        simulated=report.clock == pb.TUNE_CLOCK_SIMULATED,
        best=report.best,
        recommendation=report.recommendation,
        started_at=report.started_at,
        ended_at=report.ended_at,
        complete=report.complete,
        applied=list(report.applied_instances),
        hosts=list(report.fleet_hosts),
    )


def trial_from_proto(trial: pb.Trial) -> TrialState:
    e = trial.estimate
    measured = trial.tokens_per_second > 0
    figure = Figure(trial.tokens_per_second, trial.samples_per_second, trial.tokens_per_second_low,
                    trial.tokens_per_second_high, tuple(trial.interval_tokens_per_second))  # fmt: skip
    return TrialState(
        split=Split(trial.split.instances, trial.split.tensor_parallel_size),
        estimate=Estimate(
            FITS_BY_PROTO.get(e.fit, Fit.UNKNOWN), e.weights_bytes, e.per_device_bytes, e.usable_bytes, e.note
        ),
        phase=PHASES_BY_PROTO.get(trial.phase, Phase.PLANNED),
        message=trial.message,
        progress=trial.progress,
        figure=figure if measured else None,
        measured_s=trial.measured_seconds,
        launch_s=trial.launch_seconds,
        instances=list(trial.instances),
        host=trial.fleet_host,
    )


class _Peer:
    """A peer's part of a sweep shared among fleet hosts (a tune/shared.py Part): its own TuneService."""

    def __init__(self, relay: Relay, link: PeerLink, request: pb.TuneRequest) -> None:
        self.host = link.entry.name
        self._relay, self._link, self._request = relay, link, request

    async def plan(self) -> Report:
        async with asyncio.timeout(RELAY_TIMEOUT_S):
            return report_from_proto(await self._one(self._part(pb.TUNE_STEP_PLAN)))

    async def run(self, configs: tuple[Split, ...]) -> AsyncIterator[Update]:
        async with contextlib.aclosing(self._call(self._part(pb.TUNE_STEP_UNSPECIFIED, configs))) as responses:
            async for response in responses:
                yield report_from_proto(response.report), response.trial

    async def apply(self, split: Split) -> TrialState:
        report = await self._one(self._part(pb.TUNE_STEP_APPLY, (split,)))
        if len(report.trials) != 1:
            raise Unreachable(f"host {self.host} answered the launch of {split} without it")
        return trial_from_proto(report.trials[0])

    def _part(self, step: pb.TuneStep, configs: tuple[Split, ...] | None = None) -> pb.TuneRequest:
        part = pb.TuneRequest()
        part.CopyFrom(self._request)
        del part.hosts[:]
        part.step, part.apply = step, False
        if configs is not None:
            del part.configs[:]
            part.configs.extend(pb.Split(instances=c.instances, tensor_parallel_size=c.tp) for c in configs)
        return part

    def _call(self, part: pb.TuneRequest) -> AsyncGenerator[pb.TuneResponse, None]:
        return self._relay.stream(self._link, lambda channel: tune_pb2_grpc.TuneServiceStub(channel).Tune(part))

    async def _one(self, part: pb.TuneRequest) -> pb.TuneReport:
        async with contextlib.aclosing(self._call(part)) as responses:
            async for response in responses:
                report: pb.TuneReport = response.report
                return report
        raise Unreachable(f"host {self.host} ended the call without an answer")
