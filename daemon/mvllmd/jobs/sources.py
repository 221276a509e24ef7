"""Endpoint sources: where a job run learns which servers it may send to, as they join and leave.

A source answers two things: `current()`, the servers it may send to now (each a Target: URL, batch
size, API key), and `changed()`, which returns when that may be different. A run follows its source
for as long as it runs (run.py): a server that appears joins its dispatcher, one that is gone leaves
it (its requests go elsewhere). Two sources today:

- `FleetSource`: the daemon's READY servers of the job's model (fleet.py: its instances and the external
  servers attached to it). One that is no longer READY leaves at once, UNHEALTHY included (hung: its
  requests go elsewhere now, not after the job's own hang timeout), and joins again once READY.
- `UrlSource`: servers named by URL (`--endpoints`), there from start to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from mvllmd.fleet import Fleet
from mvllmd.jobs.targets import Target, instance_targets


class EndpointSource(Protocol):
    def current(self) -> list[Target]: ...
    async def changed(self) -> None: ...
    def close(self) -> None: ...


class UrlSource:
    def __init__(self, targets: Sequence[Target]) -> None:
        self._targets = list(targets)

    def current(self) -> list[Target]:
        return list(self._targets)

    async def changed(self) -> None:
        await asyncio.Event().wait()  # never: the list is fixed

    def close(self) -> None:
        pass


class FleetSource:
    """The daemon's READY servers of `model`, following the fleet."""

    def __init__(self, fleet: Fleet, model: str) -> None:
        self._fleet = fleet
        self._model = model
        self._changes = fleet.subscribe()

    def current(self) -> list[Target]:
        return instance_targets(self._fleet, self._model)

    async def changed(self) -> None:
        await self._changes.changed()

    def close(self) -> None:
        self._changes.close()
