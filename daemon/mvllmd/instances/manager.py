"""The instances of this host: launch, stop, list, logs, and a monitor per instance.

States: STARTING until /health answers 200 and /v1/models lists the model; READY; UNHEALTHY when
probes fail or the engine makes no progress; RESTARTING after its process exited; FAILED when it will
not come back; STOPPED once stopped (and then it is forgotten).

Restarts are decided here, for every unit manager alike (systemd units run with Restart=no):
- an engine that exits before it was ever READY is FAILED at once: a model that cannot load, a bad
  argument or a missing library would fail again, and looping hides the error;
- an engine that exits after it was READY is started again, with backoff, up to `max_restarts` times
  in RESTART_WINDOW_S, then FAILED;
- an engine UNHEALTHY for longer than `hang_timeout_s` is killed and started again, on the same budget.
Every state change is published as an InstanceEvent to subscribers (the job dispatcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mvllmd.config import Config
from mvllmd.errors import InvalidRequest, NotFound, ResourceExhausted, UnitError
from mvllmd.instances.health import Prober
from mvllmd.instances.placement import KIND_WORDS, Pool, assign, device_ref, instance_names, pick_ports, slug
from mvllmd.instances.spec import (
    EngineKind,
    InstanceSpec,
    InstanceState,
    log_path,
    read_specs,
    spec_path,
    write_spec,
)
from mvllmd.instances.units import UnitBackend
from mvllmd.inventory import Device, DeviceKind, Inventory

log = logging.getLogger(__name__)

RESTART_WINDOW_S = 300.0
MAX_BACKOFF_S = 30.0
STARTING_PROBE_S = 0.2  # while an engine starts, look often: READY as soon as it is, not a probe interval later
ENGINE_MODULES = {EngineKind.VLLM: "vllm.entrypoints.openai.api_server", EngineKind.SIM: "mvllm_sim"}
DEFAULT_MAX_NUM_SEQS = {EngineKind.VLLM: 256, EngineKind.SIM: 1024}  # each engine's own default
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LIVE = (InstanceState.STARTING, InstanceState.READY, InstanceState.UNHEALTHY, InstanceState.RESTARTING)


@dataclass(frozen=True)
class LaunchRequest:
    model: str
    count: int = 1
    tensor_parallel_size: int = 1
    engine: EngineKind = EngineKind.VLLM
    devices: str = ""
    port_base: int | None = None
    host: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)
    engine_args: tuple[str, ...] = ()
    name_prefix: str = ""
    api_key: str = ""
    force: bool = False
    cpu: bool = False
    max_num_seqs: int = 0


@dataclass(frozen=True)
class InstanceView:
    """What the API shows of an instance (never its API key or environment)."""

    spec: InstanceSpec
    state: InstanceState
    since: datetime
    pid: int
    restarts: int
    message: str
    unit: str
    ready_after_s: float


@dataclass(frozen=True)
class InstanceEvent:
    name: str
    old: InstanceState | None
    new: InstanceState
    view: InstanceView


@dataclass
class _Health:
    """What the monitor remembers between rounds."""

    last_tokens: float | None = None
    last_progress: float = field(default_factory=time.monotonic)
    unhealthy_since: float | None = None

    def reset(self) -> None:
        self.last_tokens, self.last_progress, self.unhealthy_since = None, time.monotonic(), None


@dataclass(eq=False)
class _Instance:
    spec: InstanceSpec
    api_key: str
    state: InstanceState = InstanceState.STARTING
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    message: str = ""
    pid: int = 0
    restarts: list[float] = field(default_factory=list)
    ever_ready: bool = False
    ready_after_s: float = 0.0
    started: float = field(default_factory=time.monotonic)  # launch, for ready_after_s
    started_round: float = field(default_factory=time.monotonic)  # this (re)start, for the start deadline
    monitor: asyncio.Task[None] | None = None


class InstanceManager:
    def __init__(
        self, config: Config, backend: UnitBackend, read_inventory: Callable[[], Awaitable[Inventory]]
    ) -> None:
        self._config = config
        self._state_dir = config.daemon.state_dir
        self._backend = backend
        self._read_inventory = read_inventory
        self._instances: dict[str, _Instance] = {}
        self._subscribers: set[asyncio.Queue[InstanceEvent]] = set()
        self._lock = asyncio.Lock()  # launches and stops one at a time: placement sees a settled world

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Install what the unit manager needs; re-adopt running instances, restart the others."""
        await self._backend.prepare()
        running = await self._backend.running()
        for spec in read_specs(self._state_dir):
            inst = _Instance(spec, api_key=_api_key(spec))
            self._instances[spec.name] = inst
            if spec.name in running:
                log.info("re-adopted instance %s (%s)", spec.name, spec.url)
                inst.message = "re-adopted after a daemon restart"
            else:
                log.info("instance %s was not running; starting it again", spec.name)
                try:
                    await self._backend.start(spec.name)
                except UnitError as exc:
                    self._set_state(inst, InstanceState.FAILED, str(exc))
                    continue
            inst.monitor = asyncio.create_task(self._monitor(inst))

    async def close(self) -> None:
        for inst in self._instances.values():
            if inst.monitor is not None:
                inst.monitor.cancel()
        await asyncio.gather(*(i.monitor for i in self._instances.values() if i.monitor), return_exceptions=True)
        await self._backend.close()

    # --- queries --------------------------------------------------------------------------------

    def list_instances(self) -> list[InstanceView]:
        return [self._view(i) for i in sorted(self._instances.values(), key=lambda i: i.spec.name)]

    def holders(self) -> dict[str, str]:
        """Device ref -> the instance holding it. FAILED instances hold nothing."""
        return {
            ref: inst.spec.name for inst in self._instances.values() if inst.state in LIVE for ref in inst.spec.devices
        }

    def serving(self, *states: InstanceState) -> list[tuple[InstanceView, str]]:
        """Instances in these states (READY unless told) with their API keys, for the job dispatcher
        (the API never shows a key)."""
        wanted = states or (InstanceState.READY,)
        ready = [i for i in self._instances.values() if i.state in wanted]
        return [(self._view(i), i.api_key) for i in sorted(ready, key=lambda i: i.spec.name)]

    def subscribe(self) -> asyncio.Queue[InstanceEvent]:
        queue: asyncio.Queue[InstanceEvent] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[InstanceEvent]) -> None:
        self._subscribers.discard(queue)

    # --- launch ---------------------------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> list[InstanceView]:
        python = self._engine_python(request.engine)
        _validate(request)
        async with self._lock:
            inventory = await self._read_inventory()
            pool = self._pool(inventory, request)
            groups = assign(pool, request.count, request.tensor_parallel_size, request.devices, request.force)
            prefix = request.name_prefix or slug(request.model)
            names = instance_names(prefix, request.count, set(self._instances))
            taken_ports = {i.spec.port for i in self._instances.values()}
            base = request.port_base or self._config.instances.port_base
            ports = await asyncio.to_thread(pick_ports, request.host, base, request.count, taken_ports)
            specs = [
                self._spec(request, python, name, port, group)
                for name, port, group in zip(names, ports, groups, strict=True)
            ]
            started = await self._start_all(request, specs)
        return [self._view(i) for i in started]

    def _engine_python(self, engine: EngineKind) -> str:
        if engine is EngineKind.SIM:
            return sys.executable
        python = self._config.engine.vllm_python
        if python is None:
            raise InvalidRequest("no vLLM interpreter is configured: set [engine.vllm] python or --vllm-python")
        if not os.access(python, os.X_OK) or not python.is_file():
            raise InvalidRequest(
                f"the vLLM interpreter {python} does not exist or cannot run; set [engine.vllm] python"
            )
        return str(python)

    def _pool(self, inventory: Inventory, request: LaunchRequest) -> Pool:
        if request.engine is EngineKind.SIM:
            kind, hint = DeviceKind.SIM_GPU, "--sim-gpus N"
        elif inventory.of_kind(DeviceKind.GPU) and not request.cpu:
            kind, hint = DeviceKind.GPU, ""
        else:
            kind, hint = DeviceKind.CPU_SLOT, "--cpu-slots N"
        devices = inventory.of_kind(kind)
        if not devices:
            raise ResourceExhausted(f"this host has no {KIND_WORDS[kind]}s; start mvllmd with {hint} to declare some")
        return Pool(kind, devices, self.holders())

    def _spec(
        self, request: LaunchRequest, python: str, name: str, port: int, devices: tuple[Device, ...]
    ) -> InstanceSpec:
        engine = request.engine
        argv = [python, "-m", ENGINE_MODULES[engine], "--model", request.model, "--host", request.host,
                "--port", str(port), "--tensor-parallel-size", str(request.tensor_parallel_size),
                "--served-model-name", request.model]  # fmt: skip
        if request.max_num_seqs:
            argv += ["--max-num-seqs", str(request.max_num_seqs)]
        argv += request.engine_args
        env = dict(request.env)
        if request.api_key:
            env["VLLM_API_KEY"] = request.api_key  # not in argv: /proc/PID/cmdline is world-readable
        indexes = ",".join(str(d.index) for d in devices)
        if devices[0].kind is DeviceKind.GPU:
            env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=indexes)  # NVML's numbering
        if self._config.engine.hf_home:
            env.setdefault("HF_HOME", str(self._config.engine.hf_home))
        return InstanceSpec(
            name=name,
            engine=engine,
            model=request.model,
            served_model_name=request.model,
            host=request.host,
            port=port,
            tensor_parallel_size=request.tensor_parallel_size,
            devices=tuple(device_ref(d) for d in devices),
            argv=tuple(argv),
            env=env,
            log_path=str(log_path(self._state_dir, name)),
            max_num_seqs=request.max_num_seqs or _max_num_seqs(engine, request.engine_args),
            hf_token_file=str(self._config.engine.hf_token_file or ""),
            launched_at=time.time(),
        )

    async def _start_all(self, request: LaunchRequest, specs: list[InstanceSpec]) -> list[_Instance]:
        """Start every instance, or none: a failure stops those already started and removes their specs."""
        started: list[_Instance] = []
        try:
            for spec in specs:
                write_spec(self._state_dir, spec)
                inst = _Instance(spec, api_key=request.api_key)
                self._instances[spec.name] = inst
                started.append(inst)
                await self._backend.start(spec.name)
                log.info("launched %s: %s on %s at %s", spec.name, spec.engine, ",".join(spec.devices), spec.url)
                self._publish(inst, None)
        except BaseException:
            for inst in started:
                await self._forget(inst, force=True)
            raise
        for inst in started:
            inst.monitor = asyncio.create_task(self._monitor(inst))
        return started

    # --- stop -----------------------------------------------------------------------------------

    async def stop(self, names: list[str], all_: bool, force: bool) -> list[InstanceView]:
        async with self._lock:
            if all_:
                targets = list(self._instances.values())
            else:
                unknown = [n for n in names if n not in self._instances]
                if unknown:
                    known = ", ".join(sorted(self._instances)) or "none"
                    raise NotFound(f"no instance {', '.join(unknown)}; instances: {known}")
                if not names:
                    raise InvalidRequest("name the instances to stop, or ask for all")
                targets = [self._instances[n] for n in names]
            # Shielded: a client that stops waiting must not leave an engine half-stopped and untracked.
            await asyncio.shield(asyncio.gather(*(self._forget(inst, force) for inst in targets)))
        return [self._view(inst) for inst in targets]

    async def _forget(self, inst: _Instance, force: bool) -> None:
        """Stop it, mark it STOPPED, remove its spec: it holds nothing and is listed no more."""
        if inst.monitor is not None and inst.monitor is not asyncio.current_task():
            inst.monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await inst.monitor
        await self._backend.stop(inst.spec.name, force)
        self._set_state(inst, InstanceState.STOPPED, "stopped")
        spec_path(self._state_dir, inst.spec.name).unlink(missing_ok=True)
        self._instances.pop(inst.spec.name, None)

    # --- logs -----------------------------------------------------------------------------------

    async def logs(self, name: str, follow: bool, tail: int) -> AsyncIterator[list[str]]:
        if name not in self._instances:
            raise NotFound(f"no instance {name}; instances: {', '.join(sorted(self._instances)) or 'none'}")
        path = log_path(self._state_dir, name)
        position, lines = _tail(path, tail)
        if lines:
            yield lines
        while follow and name in self._instances:
            await asyncio.sleep(0.25)
            position, lines = _read_from(path, position)
            if lines:
                yield lines

    # --- the monitor ----------------------------------------------------------------------------

    async def _monitor(self, inst: _Instance) -> None:
        prober = Prober(inst.spec, inst.api_key or None)
        health = _Health()
        try:
            while inst.state is not InstanceState.FAILED:
                interval = self._config.instances.probe_interval_s
                starting = inst.state in (InstanceState.STARTING, InstanceState.RESTARTING)
                await asyncio.sleep(min(interval, STARTING_PROBE_S) if starting else interval)
                try:
                    if not await self._round(inst, prober, health):
                        return
                except Exception:  # one bad round (systemctl, the log, a probe) must not end the watch
                    log.exception("instance %s: monitoring round failed", inst.spec.name)
        finally:
            await prober.close()

    async def _round(self, inst: _Instance, prober: Prober, health: _Health) -> bool:
        """One look at the instance; False once there is nothing more to watch."""
        status = await self._backend.status(inst.spec.name)
        if status.stopped_outside:  # e.g. `systemctl stop mvllm-instances.target`
            log.info("instance %s was stopped outside mvllmd; forgetting it", inst.spec.name)
            await self._forget(inst, force=False)
            return False
        if not status.running:
            await self._on_exit(inst, status.detail)
            health.reset()
            return True
        inst.pid = status.pid
        ok, why = await prober.ready()
        if inst.state in (InstanceState.STARTING, InstanceState.RESTARTING):
            if ok:
                self._became_ready(inst)
                health.last_progress = time.monotonic()
            elif time.monotonic() - inst.started_round > self._config.instances.start_timeout_s:
                await self._backend.stop(inst.spec.name, force=True)
                self._set_state(
                    inst, InstanceState.FAILED, f"not ready after {self._config.instances.start_timeout_s:g}s: {why}"
                )
            else:
                inst.message = why
            return True
        if ok:
            ok, why = await self._progressing(prober, health)
        await self._judge(inst, health, ok, why)
        return True

    async def _progressing(self, prober: Prober, health: _Health) -> tuple[bool, str]:
        """Did the engine make progress lately? Its token counters say so, or else a probe request."""
        timeout = self._config.instances.hang_timeout_s
        tokens = await prober.token_count()
        now = time.monotonic()
        if tokens is not None and tokens != health.last_tokens:
            health.last_tokens, health.last_progress = tokens, now
            return True, ""
        if now - health.last_progress < timeout:
            return True, ""
        if await prober.probe(deadline_s=timeout / 2):
            health.last_progress = time.monotonic()
            return True, ""
        return False, f"no progress for {now - health.last_progress:.0f}s and a probe request went unanswered"

    async def _judge(self, inst: _Instance, health: _Health, ok: bool, why: str) -> None:
        """READY again when healthy; UNHEALTHY otherwise, and killed (then restarted) if it lasts."""
        if ok:
            health.unhealthy_since = None
            if inst.state is InstanceState.UNHEALTHY:
                self._set_state(inst, InstanceState.READY, "recovered")
            return
        now = time.monotonic()
        health.unhealthy_since = health.unhealthy_since or now
        if inst.state is not InstanceState.UNHEALTHY:
            self._set_state(inst, InstanceState.UNHEALTHY, why)
        if now - health.unhealthy_since >= self._config.instances.hang_timeout_s:
            log.warning("instance %s: unhealthy for too long; killing it to start it again", inst.spec.name)
            await self._backend.kill(inst.spec.name)  # the next round sees the exit and restarts it

    def _became_ready(self, inst: _Instance) -> None:
        if not inst.ever_ready:
            inst.ever_ready = True
            inst.ready_after_s = time.monotonic() - inst.started
        self._set_state(inst, InstanceState.READY, "")

    async def _on_exit(self, inst: _Instance, detail: str) -> None:
        why = f"{detail}; log: {' | '.join(_tail(log_path(self._state_dir, inst.spec.name), 3)[1]) or 'empty'}"
        if not inst.ever_ready:
            self._set_state(inst, InstanceState.FAILED, f"the engine exited before it was ever ready: {why}")
            return
        now = time.monotonic()
        recent = [t for t in inst.restarts if now - t < RESTART_WINDOW_S]
        if len(recent) >= self._config.instances.max_restarts:
            self._set_state(inst, InstanceState.FAILED, f"{len(recent)} restarts in {RESTART_WINDOW_S:.0f}s: {why}")
            return
        self._set_state(inst, InstanceState.RESTARTING, why)
        await asyncio.sleep(min(MAX_BACKOFF_S, 2.0 ** len(recent) - 1))
        inst.restarts = [*recent, time.monotonic()]
        inst.started_round = time.monotonic()
        try:
            await self._backend.start(inst.spec.name)
        except UnitError as exc:
            self._set_state(inst, InstanceState.FAILED, str(exc))

    # --- state ----------------------------------------------------------------------------------

    def _set_state(self, inst: _Instance, state: InstanceState, message: str) -> None:
        old = inst.state
        inst.message = message
        if old is state:
            return
        inst.state, inst.since = state, datetime.now(UTC)
        level = logging.WARNING if state in (InstanceState.FAILED, InstanceState.UNHEALTHY) else logging.INFO
        # Not the engine's log lines: an engine may log requests, and prompts stay out of mvllmd's log.
        log.log(level, "instance %s: %s -> %s %s", inst.spec.name, old, state, message.split("; log:", maxsplit=1)[0])
        self._publish(inst, old)

    def _publish(self, inst: _Instance, old: InstanceState | None) -> None:
        event = InstanceEvent(inst.spec.name, old, inst.state, self._view(inst))
        for queue in self._subscribers:
            queue.put_nowait(event)

    def _view(self, inst: _Instance) -> InstanceView:
        return InstanceView(
            spec=inst.spec,
            state=inst.state,
            since=inst.since,
            pid=inst.pid,
            restarts=len(inst.restarts),
            message=inst.message,
            unit=self._backend.unit_name(inst.spec.name),
            ready_after_s=inst.ready_after_s,
        )


def _validate(request: LaunchRequest) -> None:
    if not request.model or "\0" in request.model:
        raise InvalidRequest("the model must be a non-empty string")
    if not 1 <= request.count <= 256:
        raise InvalidRequest(f"--instances must be from 1 to 256, got {request.count}")
    if not 1 <= request.tensor_parallel_size <= 64:
        raise InvalidRequest(f"--tp must be from 1 to 64, got {request.tensor_parallel_size}")
    for key, value in request.env.items():
        if not ENV_NAME.fullmatch(key) or "\0" in value:
            raise InvalidRequest(f"--env {key!r}: names are [A-Za-z_][A-Za-z0-9_]* and values hold no NUL")
    if any("\0" in arg for arg in request.engine_args):
        raise InvalidRequest("engine arguments cannot hold a NUL byte")
    if request.host != "localhost":
        try:
            ipaddress.ip_address(request.host)
        except ValueError:
            raise InvalidRequest(f"--host {request.host!r}: give an IP address of this host, e.g. 127.0.0.1") from None


def _max_num_seqs(engine: EngineKind, engine_args: tuple[str, ...]) -> int:
    """--max-num-seqs among the engine arguments, else the engine's default."""
    for i, arg in enumerate(engine_args):
        if arg == "--max-num-seqs" and i + 1 < len(engine_args) and engine_args[i + 1].isdigit():
            return int(engine_args[i + 1])
        if arg.startswith("--max-num-seqs=") and arg.split("=", 1)[1].isdigit():
            return int(arg.split("=", 1)[1])
    return DEFAULT_MAX_NUM_SEQS[engine]


def _api_key(spec: InstanceSpec) -> str:
    return spec.env.get("VLLM_API_KEY", "")


def _tail(path: Path, count: int) -> tuple[int, list[str]]:
    """The last `count` lines of a log, and the offset its end is at."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * max(count, 1)))
            data = f.read()
    except FileNotFoundError:
        return 0, []
    lines = data.decode(errors="replace").splitlines()
    return size, lines[-count:] if count else []


def _read_from(path: Path, position: int) -> tuple[int, list[str]]:
    try:
        with path.open("rb") as f:
            if f.seek(0, os.SEEK_END) < position:
                position = 0  # rotated
            f.seek(position)
            data = f.read()
    except FileNotFoundError:
        return position, []
    end = data.rfind(b"\n") + 1  # whole lines only; the rest waits for its newline
    return position + end, data[:end].decode(errors="replace").splitlines()
