"""The fleet: every server this daemon may send work to, and word when that changes.

Jobs (jobs/sources.py) and the HTTP front door (frontdoor/servers.py) learn their servers here, and only
here: this host's READY instances (instances/manager.py) and the READY external servers attached by URL
(external/servers.py), and the READY instances of every reachable peer (hosts/), named HOST/NAME and
reached through the peer's per-instance route with the token it gave this daemon. A server that is not
READY (starting, UNHEALTHY, hung, restarting, gone, on a peer that is unreachable) is not listed, so both
leave it at once. Nor is a tune trial's instance (tune/): only its trial sends it work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mvllmd.external.servers import ExternalServers
from mvllmd.hosts.hosts import Hosts
from mvllmd.instances.manager import InstanceManager
from mvllmd.instances.spec import InstanceState
from mvllmd.instances.state import LIVE


@dataclass(frozen=True)
class Server:
    name: str
    url: str  # base URL, without /v1
    model: str  # the served model name
    capacity: int  # max_num_seqs
    api_key: str = ""
    launched_as: str = ""  # the model an instance was launched with (a job may name it so)


class Subscription:
    """Word of changes from every part of the fleet: `await changed()` returns after one or more."""

    def __init__(self, queues: list[tuple[asyncio.Queue[Any], Callable[[asyncio.Queue[Any]], None]]]) -> None:
        self._queues = queues

    async def changed(self) -> None:
        gets = [asyncio.ensure_future(queue.get()) for queue, _ in self._queues]
        try:
            await asyncio.wait(gets, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for get in gets:
                get.cancel()
            await asyncio.gather(*gets, return_exceptions=True)
        for queue, _ in self._queues:
            with contextlib.suppress(asyncio.QueueEmpty):
                while True:
                    queue.get_nowait()

    def close(self) -> None:
        for queue, unsubscribe in self._queues:
            unsubscribe(queue)


class Fleet:
    def __init__(self, instances: InstanceManager, external: ExternalServers, hosts: Hosts | None = None) -> None:
        self.instances = instances
        self.external = external
        self.hosts = hosts

    def ready(self) -> list[Server]:
        """Every READY server: the instances first, by name, then the external servers, by name, then the
        peers' instances, by host and name."""
        local = [
            Server(v.spec.name, v.spec.url, v.spec.served_model_name, v.spec.max_num_seqs, key, v.spec.model)
            for v, key in self.instances.serving()
            if not v.spec.trial
        ]
        external = [
            Server(v.spec.name, v.spec.url, v.spec.model, v.spec.max_num_seqs, key)
            for v, key in self.external.serving()
        ]
        return local + external + self._remote((InstanceState.READY,), keyed=True)

    def live(self) -> list[Server]:
        """Every server that is or may soon be READY, with no key: the instances in a live state (starting,
        restarting, unhealthy) and every attached external server. What a job may ask for."""
        local = [
            Server(v.spec.name, v.spec.url, v.spec.served_model_name, v.spec.max_num_seqs, "", v.spec.model)
            for v in self.instances.list_instances()
            if v.state in LIVE and not v.spec.trial
        ]
        external = [
            Server(v.spec.name, v.spec.url, v.spec.model, v.spec.max_num_seqs) for v in self.external.list_servers()
        ]
        return local + external + self._remote(LIVE, keyed=False)

    def subscribe(self) -> Subscription:
        instances, external = self.instances.subscribe(), self.external.subscribe()
        queues: list[tuple[asyncio.Queue[Any], Callable[[asyncio.Queue[Any]], None]]] = [
            (instances, self.instances.unsubscribe),
            (external, self.external.unsubscribe),
        ]
        if self.hosts is not None:
            queues.append((self.hosts.subscribe(), self.hosts.unsubscribe))
        return Subscription(queues)

    def _remote(self, states: tuple[InstanceState, ...], keyed: bool) -> list[Server]:
        """The peers' instances in these states, while their peer is reachable; with their route token
        as the API key when `keyed`."""
        if self.hosts is None:
            return []
        return [
            Server(
                f"{link.entry.name}/{i.name}",
                link.route(i.name),
                i.model,
                i.max_num_seqs,
                link.token if keyed else "",
                i.weights_path,
            )
            for link in self.hosts.links()
            if link.reachable
            for i in link.instances
            if i.state in states and not i.trial
        ]
