"""`mvllmctl tune`: measure every way to split the devices into N instances of TP each, and pick the best."""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import click
import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from mvllm.v1 import instance_pb2, instance_pb2_grpc, tune_pb2_grpc
from mvllm.v1 import tune_pb2 as pb
from mvllmctl.client import CtlError
from mvllmctl.context import Ctl, hosts_option, json_option, pass_ctl
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.instance_commands import ENGINES, _env_pairs
from mvllmctl.output import duration, print_json, print_table

SPLIT = re.compile(r"(\d+)x(\d+)")
CLEANUP_WAIT_S = 120.0  # after Ctrl-C: how long to wait for the daemon to remove the trial's instances


def _stub(ctl: Ctl) -> tune_pb2_grpc.TuneServiceStub:
    return tune_pb2_grpc.TuneServiceStub(ctl.client.channel())


def _configs(ctx: click.Context, param: click.Parameter, value: str | None) -> list[pb.Split]:
    if not value:
        return []
    splits = []
    for part in value.split(","):
        m = SPLIT.fullmatch(part.strip().lower())
        if not m:
            raise click.BadParameter(f"{part!r}: give INSTANCESxTP, e.g. 8x1,4x2,2x4,1x8", ctx, param)
        splits.append(pb.Split(instances=int(m[1]), tensor_parallel_size=int(m[2])))
    return splits


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("model", required=False)
@click.option("--devices", metavar="LIST", help="Devices to split, e.g. 0-7. [every device of the engine's kind]")
@hosts_option("Share the splits among these fleet hosts, alike ones: each measures its share at once. [this host]")
@click.option("--engine", type=click.Choice(sorted(ENGINES)), default="vllm", show_default=True)
@click.option("--cpu", is_flag=True, help="vLLM on CPU slots even where the host has GPUs (every trial is TP 1).")
@click.option("--data", "data", type=click.Path(path_type=Path), metavar="PROMPTS",
              help="A prompts file (parquet or JSON lines) as submit reads it. [a synthetic set]")  # fmt: skip
@click.option("--prompt-column", default="prompt", show_default=True)
@click.option("--num-samples", "-k", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Samples per prompt.")  # fmt: skip
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True, help="Per sample.")
@click.option("--configs", callback=_configs, metavar="NxTP,...",
              help="Splits to try, e.g. 8x1,4x2. [every N x TP split of the devices]")  # fmt: skip
@click.option("--budget", type=click.FloatRange(5), default=600, show_default=True, metavar="SECONDS",
              help="Wall time for the whole sweep, launches included.")  # fmt: skip
@click.option("--apply", is_flag=True, help="Leave the best split launched.")
@click.option("--force", is_flag=True, help="Take GPUs that other processes use.")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment for the engines (repeatable).")
@click.option("--max-num-seqs", type=click.IntRange(1), help="The engines' --max-num-seqs.")
@click.option("--show", is_flag=True, help="Print the last sweep's report instead of running one.")
@click.option("--plot", type=click.Path(path_type=Path), metavar="FILE.png",
              help="Draw the sweep: tokens/s per split, with the spread (needs matplotlib: mvllm[bench]).")  # fmt: skip
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
@json_option
@pass_ctl
def tune(ctl: Ctl, model: str | None, devices: str | None, hosts: list[str], engine: str, cpu: bool, data: Path | None,
         prompt_column: str, num_samples: int, max_tokens: int, configs: list[pb.Split], budget: float, apply: bool,
         force: bool, env: tuple[str, ...], max_num_seqs: int | None, show: bool, plot: Path | None,
         engine_args: tuple[str, ...], as_json: bool) -> int:  # fmt: skip
    """Measure every way to split the devices into N instances of TP devices each, on MODEL and your own
    prompts, and recommend the best: the sweep the seed's tuning guide does by hand (8 x TP1, 4 x TP2,
    2 x TP4, 1 x TP8 ... "benchmark and pick the best").

    A split whose TP cannot hold the model (its weights, from the model's config.json or safetensors,
    against each device's memory times vLLM's --gpu-memory-utilization) is listed as "does not fit" and
    not tried; one that holds it with little room for the KV cache is tried. Each other split is
    launched, warmed up, given a short job on a sample of the prompts, measured in its steady state (no
    ramp, no tail) and stopped; each gets an equal share of what is left of --budget, its launch
    included, and stops early once its figure is sure. Against mvllm-sim the figures are per simulated
    second (its clock), so they hold at any --time-scale. Arguments after `--` go to the engines.

    With --hosts, the sweep is shared among alike fleet hosts (the same devices, the same splits, the
    same fits; checked on every host before anything starts): the splits are dealt out in turn and each
    host measures its share at once, so each trial gets more of the budget. The model (a local path) and
    the prompts file must be there on each host; the table says which host measured each split.

    Prints the seed's table (tokens/s with the spread, samples/s, the estimated time for the whole
    prompts file, the speedup over the largest TP) and the recommendation; --apply leaves that split
    running (with --hosts, on every host). Ctrl-C stops the trial and removes what it launched.
    `mvllmctl tune --show` prints the last report again. Exit 4 when the model fits on no split (saying
    the smallest TP that would hold it).

    \b
    Examples:
      mvllmctl tune meta-llama/Llama-3.1-8B-Instruct --data prompts.parquet -k 8 --budget 900
      mvllmctl tune /models/llama-3.1-70b --devices 0-7 --configs 4x2,2x4,1x8 --apply
      mvllmctl tune examples/models/llama-3.1-8b --engine sim -- --profile h100-8b
      mvllmctl tune /models/llama-3.1-8b --hosts gpu-1,gpu-2 --data prompts.parquet
    """
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise CtlError("--plot needs matplotlib: pip install 'mvllm[bench]'", ExitStatus.USAGE)
    if show:
        report = ctl.client.call(_stub(ctl).GetLastTune, pb.GetLastTuneRequest()).report
        if not report.trials:
            raise CtlError("no sweep has ended on this daemon yet; run `mvllmctl tune MODEL`", ExitStatus.FAILED)
        print_json(pb.GetLastTuneResponse(report=report)) if as_json else _print_report(report)
        _draw(report, plot)
        return ExitStatus.SUCCESS
    if not model:
        raise click.UsageError("give the MODEL to tune (or --show for the last report)")
    request = pb.TuneRequest(model=str(Path(model).absolute()) if Path(model).exists() else model,
                             engine=ENGINES[engine], devices=devices or "", cpu=cpu,
                             data_path=str(data.absolute()) if data else "", prompt_column=prompt_column,
                             num_samples=num_samples, max_tokens=max_tokens, configs=configs, budget_seconds=budget,
                             apply=apply, force=force, engine_args=list(engine_args), env=_env_pairs(env),
                             max_num_seqs=max_num_seqs or 0, hosts=hosts)  # fmt: skip
    last = _run(ctl, request)
    print_json(last) if as_json else _print_report(last.report)
    _draw(last.report, plot)
    return ExitStatus.SUCCESS if last.report.best >= 0 else ExitStatus.FAILED


def _run(ctl: Ctl, request: pb.TuneRequest) -> pb.TuneResponse:
    """Follow the sweep, a progress bar per trial; on Ctrl-C, cancel it and wait until its instances are gone."""
    call = _stub(ctl).Tune(request)
    last = None
    try:
        with _Bars() as bars:
            for response in ctl.client.stream(lambda _: call, request):
                last = response
                bars.update(response)
    except KeyboardInterrupt:
        call.cancel()
        _wait_removed(ctl, list(request.hosts))
        raise
    if last is None or not last.report.ended_at:
        raise CtlError("the daemon ended the sweep without its report; see its log", ExitStatus.FAILED)
    return cast(pb.TuneResponse, last)


def _wait_removed(ctl: Ctl, hosts: list[str]) -> None:
    """After Ctrl-C: the daemon (and with hosts, each host's) stops the trial; say so, and wait until it has."""
    click.echo("mvllmctl: stopping the sweep and removing its instances ...", err=True)
    stub = instance_pb2_grpc.InstanceServiceStub(ctl.client.channel())
    ends = time.monotonic() + CLEANUP_WAIT_S
    while time.monotonic() < ends:
        try:
            listed = stub.ListInstances(instance_pb2.ListInstancesRequest(hosts=hosts), timeout=10)
        except grpc.RpcError:
            return
        if not any(i.trial for i in listed.instances):
            return
        time.sleep(0.5)
    click.echo("mvllmctl: the trial's instances are still there; see mvllmctl status", err=True)


def _phase(value: int) -> str:
    return pb.TrialPhase.Name(value).removeprefix("TRIAL_PHASE_").lower().replace("_", " ")


def _fit(value: int) -> str:
    return pb.Fit.Name(value).removeprefix("FIT_").lower().replace("_", " ")


def _split(split: pb.Split) -> str:
    return f"{split.instances} x TP{split.tensor_parallel_size}"


def _where(trial: pb.Trial) -> str:
    """A trial as the progress shows it: its split, and the fleet host measuring it."""
    return f"{_split(trial.split)} on {trial.fleet_host}" if trial.fleet_host else _split(trial.split)


class _Bars:
    """A bar per trial on a terminal; elsewhere a line per change of phase."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._bar = Progress(TextColumn("{task.description:>10}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                             TimeElapsedColumn(), console=Console(stderr=True))  # fmt: skip
        self._tasks: dict[int, TaskID] = {}
        self._shown: dict[int, str] = {}

    def __enter__(self) -> _Bars:
        if self._tty:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tty:
            self._bar.stop()

    def update(self, response: pb.TuneResponse) -> None:
        for index, trial in enumerate(response.report.trials):
            detail = _detail(trial)
            if not self._tty:
                if self._shown.get(index) != _phase(trial.phase):
                    self._shown[index] = _phase(trial.phase)
                    click.echo(f"{_where(trial)}: {detail}", err=True)
                continue
            if index not in self._tasks:
                self._tasks[index] = self._bar.add_task(_where(trial), total=1.0, detail=detail)
            self._bar.update(self._tasks[index], completed=_done(trial), detail=detail)


def _done(trial: pb.Trial) -> float:
    """The bar's share: each phase a part of it."""
    parts = {pb.TRIAL_PHASE_LAUNCHING: (0.0, 0.3), pb.TRIAL_PHASE_WARMING_UP: (0.3, 0.2),
             pb.TRIAL_PHASE_MEASURING: (0.5, 0.45), pb.TRIAL_PHASE_STOPPING: (0.95, 0.05)}  # fmt: skip
    if trial.phase in parts:
        start, share = parts[trial.phase]
        return start + share * trial.progress
    return 0.0 if trial.phase == pb.TRIAL_PHASE_PLANNED else 1.0


def _detail(trial: pb.Trial) -> str:
    phase = _phase(trial.phase)
    if trial.phase in (pb.TRIAL_PHASE_SKIPPED, pb.TRIAL_PHASE_FAILED):
        return f"{phase}: {trial.message}"
    if trial.tokens_per_second:
        return f"{phase}  {trial.tokens_per_second:,.0f} tok/s"
    return phase


def _print_report(report: pb.TuneReport) -> None:
    clock = "simulated s" if report.clock == pb.TUNE_CLOCK_SIMULATED else "s"
    rows = [_row(t, i == report.best) for i, t in enumerate(report.trials)]
    headers = ["CONFIGURATION", "FITS", f"TOKENS/{clock} (SPREAD)", f"SAMPLES/{clock}", "EST. TOTAL", "SPEEDUP", "NOTE"]
    if report.fleet_hosts:  # a sweep shared among hosts: which measured each split
        headers.insert(1, "HOST")
        for row, trial in zip(rows, report.trials, strict=True):
            row.insert(1, trial.fleet_host or "-")
    print_table(headers, rows)
    data = report.data_path or "the synthetic set"
    on = f"{len(report.devices)} {_kind(report.devices)}"
    on += f" of each of {', '.join(report.fleet_hosts)}" if report.fleet_hosts else ""
    click.echo(f"\n{report.model} on {on}; {report.prompts:,} prompts of "
               f"{data} x {report.num_samples} samples, max_tokens {report.max_tokens}; the total is for all of "
               f"them{'; figures per simulated second (mvllm-sim clock)' if clock != 's' else ''}")  # fmt: skip
    click.echo(f"Recommendation: {report.recommendation or 'none'}")
    if report.applied_instances:
        click.echo(f"Applied: {', '.join(report.applied_instances)} left running")
    if not report.complete:
        click.echo("The sweep did not run to its end (stopped, or failed): the figures are what it measured.")


def _row(trial: pb.Trial, best: bool) -> list[str]:
    measured = trial.tokens_per_second > 0
    rate = (f"{trial.tokens_per_second:,.0f} ({trial.tokens_per_second_low:,.0f}-{trial.tokens_per_second_high:,.0f})"
            if measured else "-")  # fmt: skip
    return [
        _split(trial.split) + (" *" if best else ""),
        _fit(trial.estimate.fit),
        rate,
        f"{trial.samples_per_second:,.1f}" if measured else "-",
        duration(trial.estimated_total_seconds) if trial.estimated_total_seconds else "-",
        f"{trial.speedup:.2f}x" if trial.speedup else "-",
        trial.message if trial.phase != pb.TRIAL_PHASE_DONE else "",
    ]


def _kind(devices: Sequence[str]) -> str:
    kind = devices[0].split(":")[0] if devices else "device"
    return f"{kind}s"


def _draw(report: pb.TuneReport, path: Path | None) -> None:
    if path is None:
        return
    from mvllmctl.plots import PlotUnavailable, SplitBar, draw_sweep  # noqa: PLC0415  (matplotlib: an extra)

    bars = []
    for i, t in enumerate(report.trials):
        low, high = t.tokens_per_second_low, t.tokens_per_second_high
        bars.append(SplitBar(_split(t.split), t.tokens_per_second, low, high, _unmeasured(t), i == report.best))
    clock = "simulated second" if report.clock == pb.TUNE_CLOCK_SIMULATED else "second"
    try:
        draw_sweep(bars, path, f"mvllmctl tune: {Path(report.model).name}", unit=f"output tokens per {clock}")
    except PlotUnavailable as exc:
        raise CtlError(str(exc), ExitStatus.USAGE) from None
    except OSError as exc:
        raise CtlError(f"--plot {path}: cannot write it ({exc.strerror or exc})", ExitStatus.USAGE) from None
    click.echo(f"drew {path}", err=True)


def _unmeasured(trial: pb.Trial) -> str:
    """Why a split has no bar: it does not fit, or how its trial ended ("" when it was measured)."""
    if trial.tokens_per_second:
        return ""
    return _fit(trial.estimate.fit) if trial.estimate.fit == pb.FIT_DOES_NOT_FIT else _phase(trial.phase)
