"""Where a request goes: a policy is an object behind one small interface, one file each.

A policy is told of the job's lanes as they join and leave, and of every change in a lane's load
(`changed`: the dispatcher calls it whenever a request to it is sent or lands) or in what it knows of
the servers (`reindex`: after a round of /metrics readings, and a few times a second). `pick` chooses
a lane with room for a request of `want` samples, or None; `room` says how many samples a lane may
still take. `balances` says whether the dispatcher should also spread the tail (split a prompt's last
samples, move or copy slow requests): least-loaded does, round robin (the seed's way) does not.

To add a policy: a new module here with a class that has these members, and a line in POLICIES.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar, Protocol

from mvllm.jobs import Policy as PolicyName
from mvllmd.dispatch.flights import Lane
from mvllmd.dispatch.policies.least_loaded import LeastLoaded
from mvllmd.dispatch.policies.round_robin import RoundRobin


class Policy(Protocol):
    balances: ClassVar[bool]

    def add(self, lane: Lane) -> None: ...
    def remove(self, lane: Lane) -> None: ...
    def changed(self, lane: Lane) -> None: ...
    def reindex(self) -> None: ...
    def pick(self, want: int, now: float, avoid: Collection[Lane] = ()) -> Lane | None: ...
    def room(self, lane: Lane) -> int: ...


POLICIES: dict[PolicyName, type[Policy]] = {
    PolicyName.LEAST_LOADED: LeastLoaded,
    PolicyName.ROUND_ROBIN: RoundRobin,
}


def make(name: PolicyName) -> Policy:
    return POLICIES[name]()
