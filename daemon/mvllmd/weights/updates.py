"""New weights for every instance of a model, in place; sleep and wake.

An update, per instance (`_update_one`): hold it (nothing new is sent to it: dispatch/endpoint.py;
its monitor does not judge its progress), pause it as the mode says (`keep` freezes its requests,
`wait` lets them finish, `abort` ends them, and mvllmd sends them elsewhere first), reload from the
path, set the version, reset the prefix cache, record the new weights in its spec (a restart brings
them back) and in its shared `Weights` (the tokens read from it from now on are the new version's),
and resume. Instances go in parallel, or one at a time (`rolling`) so that the others keep serving.
An instance whose update fails is restarted on the new path, and reported.

The path is checked before anything changes; a model updates once at a time (a second update is
refused while one runs); an update runs to its end even if the client that asked leaves, so no
engine is left paused.

Sleep holds an instance (jobs keep their work for the others, or wait), lets its requests finish
(vLLM's sleep pauses in `wait` mode first), and puts it to sleep; wake wakes it (after a level-2
sleep: its weights first, then the current ones are loaded again, then the rest), and it resumes.
The vLLM CPU build cannot sleep (it ignores /sleep): refused there.

A (re)started instance, or one that mvllmd re-adopts after its own restart, is told its version,
and resumed if an update was cut short (`follow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from mvllmd.dispatch.endpoints import Endpoints
from mvllmd.errors import Conflict, InvalidRequest
from mvllmd.instances.engines import first_version
from mvllmd.instances.manager import InstanceManager
from mvllmd.instances.spec import EngineKind, InstanceState
from mvllmd.instances.state import Instance
from mvllmd.weights.engine import MODES, DevRoutes, EngineCallError
from mvllmd.weights.state import ASLEEP, UPDATING

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII: it travels in an HTTP header
T = TypeVar("T")


class Step(enum.StrEnum):
    WAITING = "waiting"
    PAUSING = "pausing"
    RELOADING = "reloading"
    RESUMING = "resuming"
    DONE = "done"
    FAILED = "failed"


@dataclass
class InstanceUpdate:
    name: str
    old_version: str
    step: Step = Step.WAITING
    error: str = ""
    version: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class UpdateRequest:
    model: str
    path: str
    version: str = ""  # "": the path's last part
    mode: str = "keep"
    rolling: bool = False


@dataclass
class UpdateReport:
    model: str
    version: str
    instances: list[InstanceUpdate]
    started: float = field(default_factory=time.monotonic)
    done: bool = False

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def snapshot(self) -> UpdateReport:
        return replace(self, instances=[replace(i) for i in self.instances])


@dataclass(frozen=True)
class InstanceResult:
    name: str
    ok: bool
    error: str = ""


class WeightUpdates:
    def __init__(
        self, instances: InstanceManager, endpoints: Endpoints, routes: Callable[[str], DevRoutes] = DevRoutes
    ):
        self._instances = instances
        self._endpoints = endpoints
        self._routes = routes  # a server's development routes, by URL
        self._busy: set[str] = set()  # models being updated, put to sleep or woken
        self._tasks: set[asyncio.Task[Any]] = set()
        self._follow: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._follow = asyncio.create_task(self.follow())

    # --- update ---------------------------------------------------------------------------------

    def check(self, request: UpdateRequest) -> UpdateReport:
        """Check the update as `update` would, changing nothing: the report it would begin with (a fleet
        update checks every host first)."""
        _, report, _ = self._prepared(request)
        self._free(request.model)
        return report

    def _prepared(self, request: UpdateRequest) -> tuple[str, UpdateReport, list[Instance]]:
        path = _checked_path(request.path)
        if request.mode not in MODES:
            raise InvalidRequest(f"--mode must be one of {', '.join(MODES)}, got {request.mode!r}")
        version = request.version or first_version(path)
        if not VERSION_RE.fullmatch(version):
            raise InvalidRequest(f"--version {version!r}: 1 to 128 printable ASCII characters, no spaces")
        targets = self._targets(request.model)
        report = UpdateReport(request.model, version, [InstanceUpdate(i.name, i.weights.version) for i in targets])
        return path, report, targets

    async def update(self, request: UpdateRequest) -> AsyncIterator[UpdateReport]:
        """Check, then update; yields the report at each step of each instance, the last one `done`."""
        path, report, targets = self._prepared(request)
        changed = asyncio.Event()
        self._claim(request.model)
        run = self._spawn(self._update_all(targets, report, path, request, changed))  # ends even if the client leaves
        while True:
            await changed.wait()
            changed.clear()
            if run.done():
                run.result()  # mvllmd's own fault: raise it
            snapshot = report.snapshot()  # done may be set while this one is sent: the next is the last
            yield snapshot
            if snapshot.done:
                return

    async def _update_all(
        self, targets: list[Instance], report: UpdateReport, path: str, request: UpdateRequest, changed: asyncio.Event
    ) -> None:
        version = report.version
        log.info("updating %d instances of %s to %s (%s%s)", len(targets), request.model, version, request.mode,
                 ", rolling" if request.rolling else "")  # fmt: skip
        pairs = list(zip(targets, report.instances, strict=True))
        try:
            if request.rolling:
                for inst, entry in pairs:
                    await self._update_one(inst, entry, path, version, request.mode, changed)
            else:
                await asyncio.gather(*(self._update_one(inst, entry, path, version, request.mode, changed)
                                       for inst, entry in pairs))  # fmt: skip
        finally:
            report.done = True
            changed.set()
            self._busy.discard(request.model)
        failed = [i.name for i in report.instances if i.step == Step.FAILED]
        log.info(
            "update of %s to %s done; %s",
            request.model,
            version,
            f"failed: {', '.join(failed)}" if failed else "all updated",
        )

    async def _update_one(  # noqa: PLR0917  (the one instance's update: each argument is part of it)
        self, inst: Instance, entry: InstanceUpdate, path: str, version: str, mode: str, changed: asyncio.Event
    ) -> None:
        def step(name: Step) -> None:
            entry.step = name
            changed.set()

        url = inst.spec.url
        routes = self._routes(url)
        inst.weights.held = UPDATING
        started = time.monotonic()
        try:
            if inst.state is not InstanceState.READY:
                raise EngineCallError(f"it was {inst.state}, not READY")
            step(Step.PAUSING)
            if mode == "abort":
                self._evacuate(url)  # its requests go elsewhere before the engine ends them
            await routes.pause(mode)
            step(Step.RELOADING)
            await routes.reload(path)
            await routes.set_version(version)
            await routes.reset_prefix_cache()
            step(Step.RESUMING)
            self._instances.set_weights(inst, path, version)  # tokens read from now on are the new version's
            await routes.resume()
            entry.version, entry.seconds = version, time.monotonic() - started
            step(Step.DONE)
        except EngineCallError as exc:
            entry.error = f"{exc}; restarted on the new weights"
            log.warning("instance %s: the update failed (%s); restarting it on %s", inst.name, exc, path)
            self._instances.set_weights(inst, path, version)
            self._evacuate(url)
            await self._instances.restart(inst)
            step(Step.FAILED)
        finally:
            inst.weights.held = ""
            self._released(url)
            await routes.close()

    # --- sleep and wake -------------------------------------------------------------------------

    async def sleep(self, model: str, level: int) -> list[InstanceResult]:
        if level not in (1, 2):
            raise InvalidRequest(f"--level must be 1 or 2, got {level}")
        targets = self._targets(model)
        cpu = [i.name for i in targets if i.spec.engine is EngineKind.VLLM and not _on_gpus(i)]
        if cpu:
            raise InvalidRequest(
                f"{', '.join(cpu)} run the vLLM CPU build, which cannot sleep (it ignores /sleep); "
                "sleep frees GPU memory, so it needs instances on GPUs"
            )
        return await self._all(model, targets, lambda inst: self._sleep_one(inst, level))

    async def _sleep_one(self, inst: Instance, level: int) -> InstanceResult:
        if inst.weights.sleep_level:
            return InstanceResult(inst.name, True, f"already asleep (level {inst.weights.sleep_level})")
        routes = self._routes(inst.spec.url)
        inst.weights.held = ASLEEP
        try:
            await routes.sleep(level, "wait")  # its requests finish first; nothing new goes to it meanwhile
        except EngineCallError as exc:
            inst.weights.held = ""
            with contextlib.suppress(EngineCallError):
                await routes.wake()
            return InstanceResult(inst.name, False, str(exc))
        finally:
            await routes.close()
        inst.weights.sleep_level = level
        log.info("instance %s asleep (level %d)", inst.name, level)
        return InstanceResult(inst.name, True)

    async def wake(self, model: str) -> list[InstanceResult]:
        targets = self._targets(model)
        return await self._all(model, targets, self._wake_one)

    async def _wake_one(self, inst: Instance) -> InstanceResult:
        level = inst.weights.sleep_level
        if not level:
            return InstanceResult(inst.name, True, "already awake")
        routes = self._routes(inst.spec.url)
        try:
            if level == 2:  # its weights were discarded: load the current ones before it runs again
                await routes.wake("weights")
                await routes.reload(inst.spec.weights_path)
            await routes.wake()  # the rest (the KV cache, the pause): it resumes
        except EngineCallError as exc:
            return InstanceResult(inst.name, False, str(exc))
        finally:
            await routes.close()
        inst.weights.sleep_level, inst.weights.held = 0, ""
        self._released(inst.spec.url)
        log.info("instance %s awake", inst.name)
        return InstanceResult(inst.name, True)

    # --- instances that start ------------------------------------------------------------------

    async def follow(self) -> None:
        """Tell each weight-updates instance that becomes READY its version, and resume it if an
        update was cut short (mvllmd stopped mid-way): its engine's /weight_info says what mvllmd knows."""
        events = self._instances.subscribe()
        try:
            while True:
                event = await events.get()
                if event.new is InstanceState.READY and event.old is not InstanceState.READY:
                    inst = self._instances.instance(event.name)
                    if inst is None or not inst.spec.weight_updates:
                        continue
                    if event.old in (None, InstanceState.STARTING, InstanceState.RESTARTING):
                        if inst.weights.held == ASLEEP:  # a (re)started engine is awake
                            inst.weights.held = ""
                        inst.weights.sleep_level = 0
                    if not inst.weights.held:
                        self._spawn(self._settle(inst))
        finally:
            self._instances.unsubscribe(events)

    async def _settle(self, inst: Instance) -> None:
        routes = self._routes(inst.spec.url)
        try:
            await routes.set_version(inst.spec.weight_version)
            if await routes.is_paused():
                await routes.resume()
        except EngineCallError as exc:
            log.warning("instance %s: cannot set its weight version: %s", inst.name, exc)
        finally:
            await routes.close()

    async def close(self) -> None:
        """Let updates under way finish (no engine is left paused); stop following."""
        if self._follow is not None:
            self._follow.cancel()
            await asyncio.gather(self._follow, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- the parts ------------------------------------------------------------------------------

    def _targets(self, model: str) -> list[Instance]:
        """The model's instances, all with weight updates on; raise saying what is wrong."""
        found = self._instances.of_model(model)
        if not found:
            raise InvalidRequest(f"no instance serves model {model!r}; models served: {self._served() or 'none'}")
        without = [i.name for i in found if not i.spec.weight_updates]
        if without:
            raise InvalidRequest(
                f"{', '.join(without)} run without weight updates; launch them again with "
                "`mvllmctl launch ... --weight-updates`"
            )
        return found

    def _served(self) -> str:
        views = self._instances.list_instances()
        return ", ".join(sorted({v.spec.served_model_name for v in views}))

    def _claim(self, model: str) -> None:
        """One update, sleep or wake of a model at a time; the work releases it when it ends."""
        self._free(model)
        self._busy.add(model)

    def _free(self, model: str) -> None:
        if model in self._busy:
            raise Conflict(f"{model} is being updated, put to sleep or woken already; try again once that ends")

    async def _all(
        self, model: str, targets: list[Instance], step: Callable[[Instance], Coroutine[Any, Any, InstanceResult]]
    ) -> list[InstanceResult]:
        """`step` on every target together, to the end even if the client leaves."""
        self._claim(model)

        async def run() -> list[InstanceResult]:
            try:
                return list(await asyncio.gather(*(step(inst) for inst in targets)))
            finally:
                self._busy.discard(model)

        return await asyncio.shield(self._spawn(run()))

    def _spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _evacuate(self, url: str) -> None:
        endpoint = self._endpoints.find(url)
        if endpoint is not None:
            self._endpoints.evacuate(endpoint)

    def _released(self, url: str) -> None:
        endpoint = self._endpoints.find(url)
        if endpoint is not None:
            endpoint.released()


def _checked_path(text: str) -> str:
    """The checkpoint's absolute path, if it is a readable directory; else InvalidRequest."""
    if not text or "\0" in text:
        raise InvalidRequest("--path must name a checkpoint directory")
    path = Path(text)
    if not path.is_absolute():
        raise InvalidRequest(f"--path {text!r} must be absolute (mvllmctl resolves it)")
    if not path.is_dir():
        raise InvalidRequest(f"--path {text}: no such directory on the daemon's host; nothing was changed")
    if not os.access(path, os.R_OK | os.X_OK):
        raise InvalidRequest(f"--path {text}: not readable by mvllmd; nothing was changed")
    return str(path)


def _on_gpus(inst: Instance) -> bool:
    return all(ref.startswith("gpu:") for ref in inst.spec.devices)
