"""A tune sweep: plan the splits, run a trial of each within the budget, recommend one, keep the report.

The plan is checked whole before anything starts (the request, the devices, which splits can hold the
model, the prompts), so that bad input is one error and launches nothing. Then each split that may hold
the model is a trial, in turn: launched as trial instances (only the trial sends them work; a restarted
mvllmd removes them), READY, its job measured (trial.py), stopped. Each trial gets an equal share of
the budget left when it begins; its launch comes out of that share, and its window is the rest. A
trial whose launch would not leave MIN_WINDOW_S inside the budget is skipped, saying so.

Cancelled (the caller went away, Ctrl-C), the sweep stops the trial's instances before it ends. At the
end the best split is recommended (report.py) and, with apply, launched for good; the report is kept
in STATE_DIR/tune/ either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mvllm.jobs import Sampling
from mvllmd.config import Config
from mvllmd.dispatch.endpoints import Tuning
from mvllmd.errors import Conflict, InvalidRequest, MvllmError, ResourceExhausted
from mvllmd.instances.manager import InstanceManager
from mvllmd.instances.placement import KIND_WORDS, Pool, device_ref, parse_devices, pool_for
from mvllmd.instances.request import LaunchRequest
from mvllmd.instances.spec import EngineKind, InstanceState
from mvllmd.inventory import SIM_GPU_MEMORY_BYTES, Device, DeviceKind, Inventory
from mvllmd.tune import report as reports
from mvllmd.tune.fit import GB, estimate, model_size, smallest_tp, utilization
from mvllmd.tune.report import Phase, Report, TrialState
from mvllmd.tune.shared import Part, Update, run_shared
from mvllmd.tune.splits import Split, checked
from mvllmd.tune.trial import Server, TrialJob, measure
from mvllmd.tune.workload import Workload, load

log = logging.getLogger(__name__)

MIN_WINDOW_S = 5.0  # the shortest measurement a trial gets
STOP_S = 2.0  # set aside from each trial's share for stopping it
POLL_S = 0.2
SIM_MOST_TP = 8  # the simulator models TP 1, 2, 4 and 8
PREFIX = "tune"


@dataclass(frozen=True)
class TuneRequest:
    model: str
    engine: EngineKind = EngineKind.VLLM
    devices: str = ""
    cpu: bool = False
    data_path: str = ""
    prompt_column: str = ""
    num_samples: int = 1
    max_tokens: int = 256
    configs: tuple[Split, ...] = ()
    budget_s: float = 600.0
    apply: bool = False
    force: bool = False
    engine_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    max_num_seqs: int = 0

    def launch(self, split: Split, devices: str, trial: bool) -> LaunchRequest:
        return LaunchRequest(self.model, split.instances, split.tp, self.engine, devices=devices, env=self.env,
                             engine_args=self.engine_args, name_prefix=PREFIX if trial else "", force=self.force,
                             cpu=self.cpu, max_num_seqs=self.max_num_seqs, trial=trial)  # fmt: skip


class Tuner:
    """Runs one sweep at a time on this host's instances, and keeps the last report."""

    def __init__(self, instances: InstanceManager, read_inventory: Callable[[], Awaitable[Inventory]],
                 config: Config) -> None:  # fmt: skip
        self._instances = instances
        self._read_inventory = read_inventory
        self._tuning = Tuning.of(config.jobs)
        self._start_timeout_s = config.instances.start_timeout_s  # an applied split waits this long for READY
        self._hf_home = config.engine.hf_home  # where a hub model's config may be found
        self._folder = config.daemon.state_dir / "tune"
        self._busy = False

    def last(self) -> Report | None:
        return reports.load(self._folder)

    async def tune(self, request: TuneRequest) -> AsyncIterator[Update]:
        """The sweep's updates; the last one holds the whole report. Raises before anything starts."""
        with self._alone():
            sweep = await self._plan(request)
            async for update in sweep.updates():
                yield update

    async def plan(self, request: TuneRequest) -> Report:
        """The sweep's planned report, refused as the sweep would be; nothing starts."""
        with self._alone():
            return (await self._plan(request)).report

    async def apply(self, request: TuneRequest, split: Split) -> TrialState:
        """Launch `split` for good, as a sweep's apply does; its state once READY (DONE), or why not (FAILED)."""
        with self._alone():
            sweep = await self._plan(dataclasses.replace(request, configs=(split,)))
            return await sweep.apply(split)

    def here(self, request: TuneRequest, host: str) -> Here:
        """This host's part of a sweep shared among fleet hosts."""
        return Here(self, request, host)

    def shared(self, parts: Sequence[Part], apply: bool) -> AsyncIterator[Update]:
        """A sweep shared among fleet hosts (tune/shared.py): its updates; its report is kept as the last."""
        return run_shared(parts, apply, self._folder)

    @contextlib.contextmanager
    def _alone(self) -> Iterator[None]:
        if self._busy:
            raise Conflict("a tune sweep runs already on this host; wait for it to end, or stop it (Ctrl-C)")
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    async def _plan(self, request: TuneRequest) -> Sweep:
        _check(request)
        await self._instances.room(request.launch(Split(1, 1), "", trial=True))  # the launch's own checks
        pool = pool_for(await self._read_inventory(), request.engine, request.cpu, self._instances.holders())
        chosen = _chosen(pool, request.devices, request.force)
        word = KIND_WORDS[pool.kind]
        most_tp = 1 if pool.kind is DeviceKind.CPU_SLOT else len(chosen)
        most_tp = min(most_tp, SIM_MOST_TP) if request.engine is EngineKind.SIM else most_tp
        splits = checked(request.configs, len(chosen), most_tp, word)
        size = model_size(request.model, request.engine_args, self._hf_home)
        memory, share = min(_memory(d) for d in chosen), utilization(request.engine_args)
        trials = [TrialState(s, estimate(size, s.tp, memory, share)) for s in splits]
        if size is not None and not any(t.tried for t in trials):
            need = smallest_tp(size, memory, share)
            raise ResourceExhausted(
                f"{request.model} fits on none of these splits: {size.weights_bytes / GB:.1f} GB of weights need TP "
                f"{need} or more on {word}s of {memory / GB:.1f} GB ({share:g} of it usable); the largest here is "
                f"TP {max(s.tp for s in splits)} ({len(chosen)} {word}s chosen)"
            )
        workload = await asyncio.to_thread(load, request.data_path, request.prompt_column)
        report = Report(request.model, str(request.engine), [device_ref(d) for d in chosen], workload.path,
                        workload.rows, request.num_samples, request.max_tokens, request.budget_s, trials)  # fmt: skip
        place = Place(self._tuning, self._folder, self._start_timeout_s, ",".join(str(d.index) for d in chosen))
        return Sweep(self._instances, place, request, report, workload)


@dataclass(frozen=True)
class Here:
    """This host's part of a sweep shared among fleet hosts (a tune/shared.py Part)."""

    tuner: Tuner
    request: TuneRequest
    host: str

    async def plan(self) -> Report:
        return await self.tuner.plan(self.request)

    def run(self, configs: tuple[Split, ...]) -> AsyncIterator[Update]:
        return self.tuner.tune(dataclasses.replace(self.request, configs=configs, apply=False))

    async def apply(self, split: Split) -> TrialState:
        return await self.tuner.apply(self.request, split)


def _check(request: TuneRequest) -> None:
    if not request.model:
        raise InvalidRequest("name the model to tune")
    if request.num_samples < 1 or request.max_tokens < 1:
        raise InvalidRequest("--num-samples and --max-tokens must be at least 1")
    if request.budget_s < MIN_WINDOW_S:
        raise InvalidRequest(f"--budget must be at least {MIN_WINDOW_S:g} seconds")


def _memory(device: Device) -> int:
    """A device's memory: a GPU's, as read; a simulated GPU's, as its reading says (an H100's); 0 for a CPU slot."""
    return device.memory_total_bytes or (SIM_GPU_MEMORY_BYTES if device.kind is DeviceKind.SIM_GPU else 0)


def _chosen(pool: Pool, text: str, force: bool) -> list[Device]:
    """The devices to split: those named, or every one of the kind; each free, else raise naming them."""
    word = KIND_WORDS[pool.kind]
    by_index = {d.index: d for d in pool.devices}
    indexes = parse_devices(text) if text else sorted(by_index)
    missing = [i for i in indexes if i not in by_index]
    if missing:
        raise InvalidRequest(f"--devices {text}: there is no {word} {missing[0]}; this host has {len(by_index)}")
    chosen = [by_index[i] for i in indexes]
    held = [f"{word} {d.index} by {pool.held[device_ref(d)]}" for d in chosen if device_ref(d) in pool.held]
    busy = [f"{word} {d.index} by pid {d.processes[0].pid}" for d in chosen if d.processes and not force]
    if held or busy:
        parts = [f"held by mvllmd's instances: {', '.join(held)} (stop them, or choose --devices)"] if held else []
        parts += [f"used by other processes: {', '.join(busy)} (--force takes them anyway)"] if busy else []
        raise ResourceExhausted(f"tune needs its devices free; {'; '.join(parts)}")
    return chosen


@dataclass(frozen=True)
class Place:
    """What a sweep takes from its tuner."""

    tuning: Tuning  # how the trial's job treats its servers
    folder: Path  # where its report is kept
    start_timeout_s: float  # how long an applied split's launch waits for READY
    devices: str  # the devices to split, as --devices names them


class Sweep:
    def __init__(self, instances: InstanceManager, place: Place, request: TuneRequest, report: Report,
                 workload: Workload) -> None:  # fmt: skip
        self._instances = instances
        self._tuning = place.tuning
        self._folder = place.folder
        self._start_timeout_s = place.start_timeout_s
        self._request = request
        self.report = report
        self._devices = place.devices
        self._workload = workload
        self._sampling = Sampling(max_tokens=request.max_tokens)
        self._launched: list[str] = []  # the trial instances that run now
        self._clocks: list[bool] = []  # per measured trial: whether its figures were per simulated second

    async def updates(self) -> AsyncIterator[Update]:
        """Run the sweep as a task; yield each update. Closed early (the caller left), it stops the task,
        and with it the trial's instances."""
        queue: asyncio.Queue[int] = asyncio.Queue()
        task = asyncio.create_task(self._run(queue.put_nowait))
        try:
            while not task.done() or not queue.empty():
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    continue
                yield self.report, get.result()
            task.result()  # its error, if it failed
        finally:
            if not task.done():
                task.cancel()
                await asyncio.shield(asyncio.gather(task, return_exceptions=True))

    async def _run(self, notify: Callable[[int], None]) -> None:
        report, request = self.report, self._request
        report.started_at = time.time()
        deadline = time.monotonic() + request.budget_s
        notify(-1)
        try:
            for index, trial in enumerate(report.trials):
                await self._trial(index, trial, deadline, functools.partial(notify, index))
            report.decide()
            if request.apply and report.best >= 0:
                applied = await self.apply(report.trials[report.best].split)
                report.applied = applied.instances
                if applied.phase is Phase.FAILED:
                    report.recommendation += f" --apply launched {', '.join(applied.instances)}, but {applied.message}"
            report.complete = True
        finally:
            await asyncio.shield(self._stop_trial())
            report.ended_at = time.time()
            with contextlib.suppress(Exception):
                reports.save(self._folder, report)
            notify(-1)

    async def _trial(self, index: int, trial: TrialState, deadline: float, notify: Callable[[], None]) -> None:
        if not trial.tried:
            trial.skip_untried()
            notify()
            return
        left = deadline - time.monotonic()
        launch_s = max((t.launch_s for t in self.report.trials), default=0.0)
        if left < launch_s + MIN_WINDOW_S + STOP_S:
            trial.phase = Phase.SKIPPED
            trial.message = f"not tried: the budget ran out ({left:.0f} s left; a launch took {launch_s:.0f} s)"
            notify()
            return
        share_s = left / sum(1 for t in self.report.trials[index:] if t.tried)
        if not await self._launch(trial, left - MIN_WINDOW_S - STOP_S, notify):
            await self._stop_trial()
            return
        window = max(MIN_WINDOW_S, min(share_s - trial.launch_s, deadline - time.monotonic()) - STOP_S)
        trial.phase, trial.progress = Phase.WARMING_UP, 0.0
        notify()
        log.info("tune: %s READY in %.1f s; measuring for up to %.0f s", trial.split, trial.launch_s, window)
        measuring = time.monotonic()

        def progress(warming: bool, fraction: float) -> None:
            trial.phase, trial.progress = (Phase.WARMING_UP if warming else Phase.MEASURING), fraction
            notify()

        job = TrialJob(self._served_model(), self._workload, self._sampling, self._request.num_samples, self._tuning)
        try:
            outcome = await measure(self._servers(), job, window, progress)
        except MvllmError as exc:  # this split could not be measured (TrialFailed): the next one may be
            await self._stop_trial()
            trial.phase, trial.message = Phase.FAILED, str(exc)
            notify()
            return
        trial.figure, trial.measured_s = outcome.figure, outcome.measured_s
        if trial.figure is not None:
            self._clocks.append(outcome.simulated)
            self.report.simulated = all(self._clocks)
        trial.phase, trial.progress = Phase.STOPPING, 0.0
        notify()
        stopping = time.monotonic()
        await self._stop_trial()
        log.info("tune: %s measured for %.1f s (%s), stopped in %.1f s", trial.split, time.monotonic() - measuring,
                 f"{outcome.figure.tokens_per_s:,.0f} tokens/s" if outcome.figure else "no figure",
                 time.monotonic() - stopping)  # fmt: skip
        if trial.figure is None:
            trial.phase = Phase.FAILED
            trial.message = "no steady interval was measured: the prompts ran out, or the window was too short"
        else:
            trial.phase, trial.progress = Phase.DONE, 1.0
            trial.message = "" if not outcome.ran_out else "the prompts ran out before the window ended"
        notify()

    async def _launch(self, trial: TrialState, timeout_s: float, notify: Callable[[], None]) -> bool:
        """Launch the trial's instances and wait for READY; False (and the trial FAILED) if they are not."""
        trial.phase, trial.progress = Phase.LAUNCHING, 0.0
        notify()
        started = time.monotonic()
        try:
            views = await self._instances.launch(self._request.launch(trial.split, self._devices, trial=True))
        except MvllmError as exc:  # the devices taken meanwhile, a unit manager that refused: this split only
            trial.phase, trial.message = Phase.FAILED, f"not launched: {exc}"
            notify()
            return False
        self._launched = trial.instances = [v.spec.name for v in views]

        def progress(fraction: float) -> None:
            trial.progress = fraction
            notify()

        why = await self._ready(self._launched, timeout_s, progress)
        trial.launch_s = time.monotonic() - started
        if why:
            trial.phase, trial.message = Phase.FAILED, why
            notify()
        return not why

    async def _ready(self, names: list[str], timeout_s: float, progress: Callable[[float], None]) -> str:
        """Wait until every instance is READY; why not, if one fails or the time runs out."""
        ends, seen = time.monotonic() + max(timeout_s, 0.0), -1
        while True:
            states = [self._instances.instance(n) for n in names]
            ready = sum(1 for i in states if i is not None and i.state is InstanceState.READY)
            if ready == len(names):
                return ""
            if ready != seen:
                seen = ready
                progress(ready / len(names))
            for inst in states:
                if inst is None or inst.state in (InstanceState.FAILED, InstanceState.STOPPED):
                    name = inst.name if inst is not None else "an instance"
                    return f"{name} did not start: {inst.message if inst is not None else 'it is gone'}"
                if inst.restarts:
                    return f"{inst.name} exited and was started again: {inst.message}"
            if time.monotonic() >= ends:
                return "not READY within the budget (a longer --budget gives the launch more time)"
            await asyncio.sleep(POLL_S)

    def _servers(self) -> list[Server]:
        names = set(self._launched)
        serving = self._instances.serving()
        return [Server(v.spec.url, key, v.spec.max_num_seqs) for v, key in serving if v.spec.name in names]

    def _served_model(self) -> str:
        inst = self._instances.instance(self._launched[0])
        return inst.spec.served_model_name if inst is not None else self._request.model

    async def _stop_trial(self) -> None:
        launched, self._launched = self._launched, []
        if launched:
            live = [n for n in launched if self._instances.instance(n) is not None]
            if live:
                await self._instances.stop(live, all_=False, force=True)

    async def apply(self, split: Split) -> TrialState:
        """Launch `split` for good and wait for it: DONE once READY, else FAILED saying why."""
        views = await self._instances.launch(self._request.launch(split, self._devices, trial=False))
        names = [v.spec.name for v in views]
        why = await self._ready(names, self._start_timeout_s, lambda fraction: None)
        planned = next(t.estimate for t in self.report.trials if t.split == split)
        return TrialState(split, planned, Phase.FAILED if why else Phase.DONE, why, instances=names)
