"""The policies on their own, over lanes whose loads and speeds the test sets."""

from __future__ import annotations

import random

from mvllmd.dispatch.endpoint import Endpoint
from mvllmd.dispatch.flights import Lane
from mvllmd.dispatch.policies.least_loaded import LeastLoaded
from mvllmd.dispatch.policies.round_robin import RoundRobin


def lanes(count: int, capacity: int = 64) -> list[Lane]:
    made = []
    for i in range(count):
        endpoint = Endpoint(f"http://127.0.0.1:{9000 + i}", capacity)
        endpoint.join(capacity)
        made.append(Lane(endpoint))
    return made


def brute_force(policy: LeastLoaded, all_lanes: list[Lane], want: int) -> float | None:
    """The least (load + want) / speed over lanes with room: what pick must find."""
    values = [
        (lane.load + want) / (policy.speed(lane) or policy._default)
        for lane in all_lanes
        if lane.available(0.0) and lane.load < policy.share(lane)
    ]
    return min(values, default=None)


def test_least_loaded_picks_the_least_load_per_speed_exactly() -> None:
    rng = random.Random(7)
    for _ in range(200):
        group = lanes(rng.randint(1, 40))
        policy = LeastLoaded()
        for lane in group:
            lane.endpoint.speed = rng.choice([0.0, 1.0, 2.0, 5.0, rng.uniform(0.1, 10)])
            policy.add(lane)
        for lane in group:
            lane.inflight = rng.randint(0, 70)
            policy.changed(lane)
        want = rng.choice([1, 1, 4, 8])
        picked = policy.pick(want, now=0.0)
        best = brute_force(policy, group, want)
        if best is None:
            assert picked is None
        else:
            assert picked is not None
            assert (picked.load + want) / (policy.speed(picked) or policy._default) == best


def test_least_loaded_follows_loads_as_they_change() -> None:
    group = lanes(3)
    policy = LeastLoaded()
    for lane in group:
        policy.add(lane)
    picks = []
    for _ in range(9):  # equal speeds: each request to the least loaded, so they fill evenly
        lane = policy.pick(1, now=0.0)
        assert lane is not None
        lane.inflight += 1
        policy.changed(lane)
        picks.append(group.index(lane))
    assert sorted(picks) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    group[1].inflight = 0  # its requests landed
    policy.changed(group[1])
    assert policy.pick(1, now=0.0) is group[1]


def test_a_full_or_broken_lane_is_skipped_and_comes_back() -> None:
    group = lanes(2, capacity=2)
    policy = LeastLoaded()
    for lane in group:
        policy.add(lane)
    group[0].inflight = 2  # full
    policy.changed(group[0])
    assert policy.pick(1, now=0.0) is group[1]
    group[1].endpoint.failed(started=0.0, now=0.0)
    for _ in range(4):
        group[1].endpoint.failed(started=0.0, now=0.0)  # out for 2 s
    assert policy.pick(1, now=1.0) is None
    group[0].inflight = 0
    policy.changed(group[0])
    assert policy.pick(1, now=1.0) is group[0]
    group[0].inflight = 2
    policy.changed(group[0])
    assert policy.pick(1, now=2.5) is group[1]  # its cooldown is over: it may take one request


def test_an_avoided_lane_is_taken_only_when_nothing_else_has_room() -> None:
    group = lanes(2)
    policy = LeastLoaded()
    for lane in group:
        policy.add(lane)
    group[1].inflight = 10
    policy.changed(group[1])
    assert policy.pick(1, now=0.0, avoid={group[0]}) is group[1]
    group[1].inflight = 64
    policy.changed(group[1])
    assert policy.pick(1, now=0.0, avoid={group[0]}) is group[0]


def test_round_robin_takes_turns_whatever_the_load() -> None:
    group = lanes(3)
    policy = RoundRobin()
    for lane in group:
        policy.add(lane)
    group[0].inflight = 10_000
    assert [group.index(policy.pick(1, now=0.0)) for _ in range(6)] == [0, 1, 2, 0, 1, 2]  # type: ignore[arg-type]
    policy.remove(group[1])
    assert [group.index(policy.pick(1, now=0.0)) for _ in range(4)] == [0, 2, 0, 2]  # type: ignore[arg-type]


def test_per_sequence_speeds_share_a_light_load_between_equal_servers() -> None:
    # Two equal servers, one given more so far: its peak rate is ten times the other's, its decode step
    # the same. By peak rate every request would go to it; by step (the front door's) they alternate.
    group = lanes(2)
    for lane, peak in zip(group, (1000.0, 100.0), strict=True):
        lane.endpoint.gauges.peak_tokens_per_s = peak
        lane.endpoint.gauges.min_step_s = 0.02
    by_rate, by_step = LeastLoaded(), LeastLoaded(per_sequence=True)
    for policy in (by_rate, by_step):
        for lane in group:
            policy.add(lane)

    def split(policy: LeastLoaded) -> list[int]:
        counts = [0, 0]
        for lane in group:
            lane.inflight = 0
            policy.changed(lane)
        for _ in range(8):
            lane = policy.pick(1, now=0.0)
            assert lane is not None
            lane.inflight += 1
            policy.changed(lane)
            counts[group.index(lane)] += 1
        return counts

    assert split(by_rate) == [8, 0]
    assert split(by_step) == [4, 4]
    group[1].endpoint.gauges.min_step_s = 0.04  # one twice as slow a step: it holds a third
    by_step.reindex()
    assert split(by_step) == [5, 3]
