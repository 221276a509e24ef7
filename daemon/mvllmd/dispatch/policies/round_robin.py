"""The seed's policy: each request to the next server in turn, whatever it already holds.

The server queues what it cannot run; only `max_concurrent` bounds what is sent. A server taken out by
its breaker, or gone, is skipped. One request per prompt's samples; no tail handling.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from typing import ClassVar

from mvllmd.dispatch.flights import Lane

UNBOUNDED = 1 << 30


class RoundRobin:
    balances: ClassVar[bool] = False

    def __init__(self) -> None:
        self._lanes: list[Lane] = []
        self._turn = itertools.count()

    def add(self, lane: Lane) -> None:
        self._lanes.append(lane)

    def remove(self, lane: Lane) -> None:
        self._lanes = [other for other in self._lanes if other is not lane]

    def changed(self, lane: Lane) -> None:
        pass

    def reindex(self) -> None:
        pass

    def pick(self, want: int, now: float, avoid: Collection[Lane] = ()) -> Lane | None:
        for _ in range(len(self._lanes)):
            lane = self._lanes[next(self._turn) % len(self._lanes)]
            if lane.usable(now):
                return lane
        return None

    def room(self, lane: Lane) -> int:
        return UNBOUNDED
