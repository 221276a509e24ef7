"""The fleet: every server this daemon may send work to, and word when that changes.

Jobs (jobs/sources.py) and the HTTP front door (frontdoor/servers.py) learn their servers here, and only
here: this host's READY instances (instances/manager.py) and the READY external servers attached by URL
(external/servers.py); later, other hosts' instances. A server that is not READY (starting, UNHEALTHY,
hung, restarting, gone) is not listed, so both leave it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mvllmd.external.servers import ExternalServers
from mvllmd.instances.manager import InstanceManager
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
    def __init__(self, instances: InstanceManager, external: ExternalServers) -> None:
        self.instances = instances
        self.external = external

    def ready(self) -> list[Server]:
        """Every READY server: the instances first, by name, then the external servers, by name."""
        local = [
            Server(v.spec.name, v.spec.url, v.spec.served_model_name, v.spec.max_num_seqs, key, v.spec.model)
            for v, key in self.instances.serving()
        ]
        external = [
            Server(v.spec.name, v.spec.url, v.spec.model, v.spec.max_num_seqs, key)
            for v, key in self.external.serving()
        ]
        return local + external

    def live(self) -> list[Server]:
        """Every server that is or may soon be READY, with no key: the instances in a live state (starting,
        restarting, unhealthy) and every attached external server. What a job may ask for."""
        local = [
            Server(v.spec.name, v.spec.url, v.spec.served_model_name, v.spec.max_num_seqs, "", v.spec.model)
            for v in self.instances.list_instances()
            if v.state in LIVE
        ]
        external = [
            Server(v.spec.name, v.spec.url, v.spec.model, v.spec.max_num_seqs) for v in self.external.list_servers()
        ]
        return local + external

    def subscribe(self) -> Subscription:
        instances, external = self.instances.subscribe(), self.external.subscribe()
        return Subscription([(instances, self.instances.unsubscribe), (external, self.external.unsubscribe)])
