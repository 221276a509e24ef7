"""The external servers of this daemon: attach, detach, list; each followed by its health watch.

An attach is checked before anything is kept: the URL (http or https, a host, a port), the name (given,
or derived from the host and port; unique among the instances and the external servers, and so is the
URL), and the server itself (it answers, takes the key, serves the model). Then its spec and key are
saved (store.py), it is checked once more for health, and its watch (watch.py) follows it until it is
detached. A daemon start loads every saved server, STARTING until its first check.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from mvllmd.config import InstanceSettings
from mvllmd.errors import Conflict, InvalidRequest, NotFound
from mvllmd.external.check import served_model
from mvllmd.external.spec import ExternalSpec, check_name, default_name, parse_url
from mvllmd.external.state import Changes, ExternalServer, ExternalView
from mvllmd.external.store import ExternalStore
from mvllmd.external.watch import Watch
from mvllmd.instances.health import Prober
from mvllmd.instances.spec import InstanceState


@dataclass(frozen=True)
class AttachRequest:
    url: str
    model: str = ""
    name: str = ""
    api_key: str = ""
    max_num_seqs: int = 0  # 0: the daemon's default


Local = Callable[[], dict[str, str]]  # the daemon's instances: name -> URL


class ExternalServers:
    def __init__(self, store: ExternalStore, settings: InstanceSettings, default_max_num_seqs: int,
                 local: Local = dict) -> None:  # fmt: skip
        self._store = store
        self._settings = settings
        self._default_max_num_seqs = default_max_num_seqs
        self._local = local
        self._servers: dict[str, ExternalServer] = {}
        self._changes = Changes()
        self._lock = asyncio.Lock()  # attaches and detaches one at a time: names are checked on a settled set

    async def start(self) -> None:
        for spec, key in self._store.load():
            server = ExternalServer(spec, key, message="not checked yet")
            self._servers[spec.name] = server
            self._watch(server, Watch(server, self._changes, self._settings))

    async def close(self) -> None:
        watches = [s.watch for s in self._servers.values() if s.watch is not None]
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)

    # --- queries --------------------------------------------------------------------------------

    def list_servers(self) -> list[ExternalView]:
        return [s.view() for s in sorted(self._servers.values(), key=lambda s: s.name)]

    def serving(self) -> list[tuple[ExternalView, str]]:
        """The READY servers, with their API keys (for the dispatchers: the API never shows a key)."""
        ready = [s for s in self._servers.values() if s.state is InstanceState.READY]
        return [(s.view(), s.api_key) for s in sorted(ready, key=lambda s: s.name)]

    def subscribe(self) -> asyncio.Queue[str]:
        return self._changes.subscribe()

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self._changes.unsubscribe(queue)

    # --- attach and detach ----------------------------------------------------------------------

    async def attach(self, request: AttachRequest) -> ExternalView:
        url = parse_url(request.url)
        name = request.name or default_name(url)
        check_name(name)
        if request.max_num_seqs < 0:
            raise InvalidRequest("max_num_seqs must be positive")
        async with self._lock:
            self._check_unique(name, url)
            model = await served_model(url, request.model, request.api_key)
            spec = ExternalSpec(name, url, model, request.max_num_seqs or self._default_max_num_seqs)
            self._store.save(spec, request.api_key)
            server = ExternalServer(spec, request.api_key)
            self._servers[name] = server
            watch, prober = Watch(server, self._changes, self._settings), Prober(spec, request.api_key or None)
            try:
                await watch.check(prober)  # the answer says READY (or why not) at once
            finally:
                self._watch(server, watch, prober)
        return server.view()

    def _check_unique(self, name: str, url: str) -> None:
        local = self._local()
        if name in self._servers:
            raise Conflict(
                f"an external server named {name} is attached already ({self._servers[name].spec.url}); "
                "detach it first (mvllmctl detach NAME), or pass --name for another name"
            )
        if name in local:
            raise Conflict(f"{name} is the name of an instance of this daemon; pass --name for another name")
        same = [s.name for s in self._servers.values() if s.spec.url == url]
        same += [n for n, u in local.items() if u == url]
        if same:
            raise Conflict(f"{url} is attached already, as {same[0]}")

    async def detach(self, name: str) -> ExternalView:
        async with self._lock:
            server = self._servers.get(name)
            if server is None:
                attached = ", ".join(sorted(self._servers)) or "none"
                raise NotFound(f"no external server {name}; attached: {attached}")
            if server.watch is not None:
                server.watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await server.watch
            self._store.remove(name)
            del self._servers[name]
            self._changes.set_state(server, InstanceState.STOPPED, "detached")
        return server.view()

    def _watch(self, server: ExternalServer, watch: Watch, prober: Prober | None = None) -> None:
        prober = prober or Prober(server.spec, server.api_key or None)
        server.watch = asyncio.create_task(watch.run(prober))
