"""The instances of this host: the manager launches, stops and lists them, serves their logs, and
publishes their state changes. It coordinates; the parts are elsewhere:

- request.py checks a launch request; placement.py chooses names, devices and ports; engines.py writes
  the engine's argv and environment into the spec (spec.py);
- a unit backend (backends/) starts and stops the engine, which runs the launcher (launcher.py);
- a monitor per instance (supervision.py) judges its health and restarts it; state.py holds its state
  and publishes each change; logs.py reads its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from mvllmd.config import Config
from mvllmd.errors import InvalidRequest, NotFound, ResourceExhausted, UnitError
from mvllmd.instances.backends.protocol import UnitBackend
from mvllmd.instances.engines import api_key, engine_python, instance_spec
from mvllmd.instances.logs import read_log
from mvllmd.instances.placement import assign, instance_names, pick_ports, pool_for, room, slug
from mvllmd.instances.request import LaunchRequest, check_model_path, validate
from mvllmd.instances.spec import InstanceSpec, InstanceState, log_path, read_specs, spec_path, write_spec
from mvllmd.instances.state import LIVE, Events, Instance, InstanceEvent, InstanceView
from mvllmd.instances.supervision import Monitor
from mvllmd.inventory import Inventory
from mvllmd.weights.state import Weights

log = logging.getLogger(__name__)


class InstanceManager:
    def __init__(
        self, config: Config, backend: UnitBackend, read_inventory: Callable[[], Awaitable[Inventory]]
    ) -> None:
        self._config = config
        self._state_dir = config.daemon.state_dir
        self._backend = backend
        self._read_inventory = read_inventory
        self._instances: dict[str, Instance] = {}
        self._events = Events()
        self._lock = asyncio.Lock()  # launches and stops one at a time: placement sees a settled world
        self._stopping = asyncio.Event()  # the daemon stops: watches end

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Install what the backend needs; re-adopt running instances, restart the others, remove those of
        a tune trial (their sweep ended with the daemon that ran it)."""
        await self._backend.prepare()
        running = await self._backend.running()
        for spec in read_specs(self._state_dir):
            inst = self._track(spec, api_key(spec))
            if spec.trial:  # its sweep ended with the daemon that ran it
                await self._remove_trial(inst)
                continue
            if spec.name in running:
                log.info("re-adopted instance %s (%s)", spec.name, spec.url)
                inst.message = "re-adopted after a daemon restart"
            elif not await self._start_again(inst):
                continue
            self._watch(inst)

    async def _start_again(self, inst: Instance) -> bool:
        """Start an instance that was not running when mvllmd started; False (and FAILED) if it cannot."""
        log.info("instance %s was not running; starting it again", inst.name)
        try:
            await self._backend.start(inst.name)
        except UnitError as exc:
            self._events.set_state(inst, InstanceState.FAILED, str(exc))
            return False
        return True

    async def _remove_trial(self, inst: Instance) -> None:
        log.info("removing instance %s, left by a tune trial that mvllmd's restart ended", inst.name)
        try:
            await self._forget(inst, force=True)
        except UnitError as exc:
            self._events.set_state(inst, InstanceState.FAILED, f"a tune trial's, and it could not be stopped: {exc}")

    async def close(self) -> None:
        monitors = [i.monitor for i in self._instances.values() if i.monitor is not None]
        for monitor in monitors:
            monitor.cancel()
        await asyncio.gather(*monitors, return_exceptions=True)
        await self._backend.close()

    # --- queries --------------------------------------------------------------------------------

    def list_instances(self) -> list[InstanceView]:
        return [i.view() for i in sorted(self._instances.values(), key=lambda i: i.name)]

    def holders(self) -> dict[str, str]:
        """Device ref -> the instance holding it. FAILED instances hold nothing."""
        return {ref: inst.name for inst in self._instances.values() if inst.state in LIVE for ref in inst.spec.devices}

    def serving(self, *states: InstanceState) -> list[tuple[InstanceView, str]]:
        """Instances in these states (READY unless told) with their API keys, for the job dispatcher
        (the API never shows a key)."""
        wanted = states or (InstanceState.READY,)
        ready = [i for i in self._instances.values() if i.state in wanted]
        return [(i.view(), i.api_key) for i in sorted(ready, key=lambda i: i.name)]

    def of_model(self, model: str) -> list[Instance]:
        """The live instances that serve `model` (their served name, or the model they were launched
        with), by name. For the weights' updates, which change them (`set_weights`)."""
        found = [
            i for i in self._instances.values() if i.state in LIVE and model in (i.spec.served_model_name, i.spec.model)
        ]
        return sorted(found, key=lambda i: i.name)

    def instance(self, name: str) -> Instance | None:
        return self._instances.get(name)

    def target(self, name: str) -> tuple[str, str] | None:
        """An instance's URL and API key, for the per-instance route (frontdoor/instance_route.py)."""
        inst = self._instances.get(name)
        return (inst.spec.url, inst.api_key) if inst is not None else None

    def weights_of(self, url: str) -> Weights | None:
        """The weights of the instance at `url` (shared: dispatch/endpoints.py holds them by reference)."""
        for inst in self._instances.values():
            if inst.spec.url == url:
                return inst.weights
        return None

    def set_weights(self, inst: Instance, path: str, version: str) -> None:
        """From now on the instance serves `version`, and loads `path` when it starts again (its spec,
        written first: a restart of mvllmd or of the engine brings the new weights back)."""
        spec = inst.spec.with_weights(path, version)
        write_spec(self._state_dir, spec)
        inst.spec = spec
        inst.weights.version = version
        self._events.publish(inst, inst.state)

    async def restart(self, inst: Instance) -> None:
        """Kill its engine: the monitor starts it again from its spec (backoff and budget as for a crash)."""
        await self._backend.kill(inst.name)

    def subscribe(self) -> asyncio.Queue[InstanceEvent]:
        return self._events.subscribe()

    def unsubscribe(self, queue: asyncio.Queue[InstanceEvent]) -> None:
        self._events.unsubscribe(queue)

    async def watch(self) -> AsyncIterator[tuple[list[InstanceView], list[str]]]:
        """Every instance, at once and after each change, with the names of those that changed (changes
        that come together are told together), until the daemon stops."""
        queue = self.subscribe()
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            yield self.list_instances(), []
            while True:
                get = asyncio.ensure_future(queue.get())
                try:
                    await asyncio.wait({get, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    get.cancel()  # the daemon stops, or the watcher left: no get is left pending
                if get.cancelled():
                    return
                changed = {get.result().name}
                while not queue.empty():
                    changed.add(queue.get_nowait().name)
                yield self.list_instances(), sorted(changed)
        finally:
            stopping.cancel()
            self.unsubscribe(queue)

    def stop_watches(self) -> None:
        """End every watch: the daemon is stopping (a watch would otherwise hold its drain to the end)."""
        self._stopping.set()

    # --- launch ---------------------------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> list[InstanceView]:
        request, python = self._checked(request)
        async with self._lock:
            specs = await self._place(request, python)
            started = await self._start_all(request, specs)
        return [i.view() for i in started]

    async def room(self, request: LaunchRequest) -> int:
        """Check a launch as `launch` would, starting nothing; how many of its instances fit now (a fleet
        launch asks every host this before it places them)."""
        request, _ = self._checked(request)
        inventory = await self._read_inventory()
        try:
            pool = pool_for(inventory, request.engine, request.cpu, self.holders())
        except ResourceExhausted:  # no devices of the kind here: room for none
            return 0
        return room(pool, request.tensor_parallel_size, request.force)

    def _checked(self, request: LaunchRequest) -> tuple[LaunchRequest, str]:
        """The request with the config's defaults, checked; the engine's interpreter."""
        if request.weight_updates is None:
            request = replace(request, weight_updates=self._config.instances.weight_updates)
        python = engine_python(self._config.engine, request.engine)
        validate(request)
        check_model_path(request.model)
        return request, python

    async def _place(self, request: LaunchRequest, python: str) -> list[InstanceSpec]:
        """The specs of the request's instances: their names, devices and ports."""
        inventory = await self._read_inventory()
        pool = pool_for(inventory, request.engine, request.cpu, self.holders())
        groups = assign(pool, request.count, request.tensor_parallel_size, request.devices, request.force)
        names = instance_names(request.name_prefix or slug(request.model), request.count, set(self._instances))
        taken_ports = {i.spec.port for i in self._instances.values()}
        base = request.port_base or self._config.instances.port_base
        ports = await asyncio.to_thread(pick_ports, request.host, base, request.count, taken_ports)
        places = zip(names, ports, groups, strict=True)
        return [instance_spec(self._config, request, python, name=n, port=p, devices=g) for n, p, g in places]

    async def _start_all(self, request: LaunchRequest, specs: list[InstanceSpec]) -> list[Instance]:
        """Start every instance, or none: a failure stops those already started and removes their specs."""
        started: list[Instance] = []
        try:
            for spec in specs:
                write_spec(self._state_dir, spec)
                inst = self._track(spec, request.api_key)
                started.append(inst)
                await self._backend.start(spec.name)
                log.info("launched %s: %s on %s at %s", spec.name, spec.engine, ",".join(spec.devices), spec.url)
                self._events.publish(inst, None)
        except BaseException:
            for inst in started:
                await self._forget(inst, force=True)
            raise
        for inst in started:
            self._watch(inst)
        return started

    # --- stop -----------------------------------------------------------------------------------

    async def stop(self, names: list[str], all_: bool, force: bool) -> list[InstanceView]:
        async with self._lock:
            targets = list(self._instances.values()) if all_ else self._named(names)
            # Shielded: a client that stops waiting must not leave an engine half-stopped and untracked.
            await asyncio.shield(asyncio.gather(*(self._forget(inst, force) for inst in targets)))
        return [inst.view() for inst in targets]

    def _named(self, names: list[str]) -> list[Instance]:
        unknown = [n for n in names if n not in self._instances]
        if unknown:
            raise NotFound(f"no instance {', '.join(unknown)}; instances: {self._known()}")
        if not names:
            raise InvalidRequest("name the instances to stop, or ask for all")
        return [self._instances[n] for n in names]

    async def _forget(self, inst: Instance, force: bool) -> None:
        """Stop it, mark it STOPPED, remove its spec: it holds nothing and is listed no more."""
        if inst.monitor is not None and inst.monitor is not asyncio.current_task():
            inst.monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await inst.monitor
        await self._backend.stop(inst.name, force)
        self._events.set_state(inst, InstanceState.STOPPED, "stopped")
        spec_path(self._state_dir, inst.name).unlink(missing_ok=True)
        self._instances.pop(inst.name, None)

    # --- logs -----------------------------------------------------------------------------------

    async def logs(self, name: str, follow: bool, tail: int) -> AsyncIterator[list[str]]:
        if name not in self._instances:
            raise NotFound(f"no instance {name}; instances: {self._known()}")
        lines = read_log(log_path(self._state_dir, name), tail, follow, alive=lambda: name in self._instances)
        async for chunk in lines:
            yield chunk

    # --- the parts ------------------------------------------------------------------------------

    def _track(self, spec: InstanceSpec, key: str) -> Instance:
        inst = Instance(spec, api_key=key, unit=self._backend.unit_name(spec.name))
        self._instances[spec.name] = inst
        return inst

    def _watch(self, inst: Instance) -> None:
        settings, state_dir = self._config.instances, self._state_dir
        monitor = Monitor(inst, self._backend, self._events, settings=settings, state_dir=state_dir, forget=self._gone)
        inst.monitor = asyncio.create_task(monitor.run())

    async def _gone(self, inst: Instance) -> None:
        """Stopped outside mvllmd: forgotten, as if stopped here."""
        await self._forget(inst, force=False)

    def _known(self) -> str:
        return ", ".join(sorted(self._instances)) or "none"
