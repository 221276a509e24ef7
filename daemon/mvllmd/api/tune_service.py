"""TuneService: translates a tune sweep's request and reports between protos and the domain (tune/)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from mvllm.v1 import tune_pb2 as pb
from mvllm.v1 import tune_pb2_grpc
from mvllmd.api.boundary import rpc, rpc_stream
from mvllmd.api.instance_service import ENGINES, ENGINES_BY_PROTO
from mvllmd.instances.spec import EngineKind
from mvllmd.tune.fit import Fit
from mvllmd.tune.report import Phase, Report, TrialState
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
DEFAULT_MAX_TOKENS = 256
DEFAULT_BUDGET_S = 600.0


class TuneServicer(tune_pb2_grpc.TuneServiceServicer):  # type: ignore[misc]  # untyped stub base
    def __init__(self, tuner: Tuner) -> None:
        self._tuner = tuner

    @rpc_stream
    async def Tune(self, request: pb.TuneRequest, context: Any) -> AsyncIterator[pb.TuneResponse]:
        async for report, trial in self._tuner.tune(request_from_proto(request)):
            yield pb.TuneResponse(report=report_to_proto(report), trial=trial)

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
    )


def _trial(report: Report, trial: TrialState) -> pb.Trial:
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
        estimated_total_seconds=report.total_s(trial),
        speedup=report.speedup(trial),
        instances=trial.instances,
    )


def _estimate(trial: TrialState) -> pb.FitEstimate:
    e = trial.estimate
    return pb.FitEstimate(fit=FITS[e.fit], weights_bytes=e.weights_bytes, per_device_bytes=e.per_device_bytes,
                          usable_bytes=e.usable_bytes, note=e.note)  # fmt: skip
