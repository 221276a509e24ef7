"""least-loaded (the default): each request goes where it will be done soonest.

That is the lane with the least load (the job's samples in flight and other clients' sequences) per
unit of the server's speed, counting the request itself: min over lanes of (load + want) / speed. The
speed is the peak generation rate the server's gauges have shown, when every server's have shown
one (the server's own measure, there within a reading or two); else the samples it completed per
second (which lags: a slow server's first answers come late); a server not yet measured counts as
fast as the fastest. A slower server may hold less, in proportion to its speed (`share`), so that
little work is left stranded on it at the end. The front door's (`per_sequence`) takes instead how
fast a server makes one sequence's tokens at its lightest (1 / its fastest decode step seen): its
load seldom fills a server, so a peak rate would measure what it was given.

The choice costs the same whatever the number of servers: the lanes sit in a heap keyed by
(load + hint) / speed, where the hint is the request size most asked for (a prompt's samples; one
in the tail), updated when a lane's load changes (`changed`) and re-keyed when speeds change
(`reindex`). For a request of the hint's size the first lane with room is the best; for another
size, `pick` takes lanes off the top until none below could beat the best found. A lane that is full or out
is set aside until its load changes or its cooldown ends; entries left stale by a change are skipped.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Collection
from typing import ClassVar

from mvllmd.dispatch.flights import Lane

REINDEX_GAIN = 1.1  # a lane this much faster than the fastest known re-keys them all (else: the next reindex)
OUT_RECHECK_S = 0.05  # a lane set aside as out is looked at again at least this often once due
HINT_MISSES = 8  # requests of another size in a row before the keys count that size


class LeastLoaded:
    balances: ClassVar[bool] = True

    def __init__(self, per_sequence: bool = False) -> None:
        # per_sequence: a server's speed is how fast it makes one sequence's tokens at its lightest
        # (1 / its fastest decode step seen), not its peak rate. For the front door, whose load rarely
        # fills a server: a peak rate measures the load a server was given, so a server given little
        # looked slow and was given nothing (two equal vLLM engines split 16 requests 0:32).
        self._per_sequence = per_sequence
        self._lanes: list[Lane] = []
        self._heap: list[tuple[float, int, int, Lane]] = []
        self._order = itertools.count()
        self._out: list[Lane] = []  # set aside while their breaker holds them out
        self._out_due = math.inf
        self.by_rate = False  # every lane's gauges have shown a rate: speeds come from them
        self._fastest = 0.0  # the highest measured speed: shares are in proportion to it
        self._default = 1.0  # the speed of a lane not measured yet
        self._slowest = 1.0  # the lowest speed, a lane not measured counted at the default
        self._hint = 1  # the request size the keys count (see _expect)
        self._misses = 0

    # --- what it is told -------------------------------------------------------------------------

    def add(self, lane: Lane) -> None:
        self._lanes.append(lane)
        self.reindex()

    def remove(self, lane: Lane) -> None:
        self._lanes = [other for other in self._lanes if other is not lane]
        lane.version += 1  # its entries are stale now
        self.reindex()

    def changed(self, lane: Lane) -> None:
        speed = self.speed(lane)
        if speed > self._fastest * REINDEX_GAIN:
            self.reindex()  # a first measure, or a new fastest: every share and default moves
        elif not lane.left:
            self._push(lane)

    def reindex(self) -> None:
        """Speeds, limits or other clients' loads changed: every lane's key and share anew."""
        live = [lane for lane in self._lanes if not lane.left]
        self.by_rate = bool(live) and all(lane.endpoint.gauges.peak_tokens_per_s > 0 for lane in live)
        speeds = [self.speed(lane) for lane in live]
        self._fastest = max(speeds, default=0.0)
        self._default = self._fastest or 1.0
        self._slowest = min((speed or self._default for speed in speeds), default=self._default)
        self._heap.clear()
        self._out.clear()
        self._out_due = math.inf
        for lane in live:
            self._push(lane)

    # --- what it answers -------------------------------------------------------------------------

    @property
    def fastest(self) -> float:
        """The highest speed among the lanes at the last reindex (0 while none is measured)."""
        return self._fastest

    def speed(self, lane: Lane) -> float:
        endpoint = lane.endpoint
        if self._per_sequence:
            step = endpoint.gauges.min_step_s
            return 1.0 / step if step > 0 else 0.0  # 0: not measured, counted as fast as the fastest
        return endpoint.gauges.peak_tokens_per_s if self.by_rate else endpoint.speed

    def _speed_of(self, lane: Lane) -> float:
        return self.speed(lane) or self._default

    def value(self, lane: Lane, want: int) -> float:
        """How soon a request of `want` samples would be done on `lane`: (load + want) / speed (lower is sooner)."""
        return (lane.load + want) / self._speed_of(lane)

    def share(self, lane: Lane) -> int:
        """The most the lane may hold: its limit, in proportion to its speed against the fastest."""
        speed = self.speed(lane)
        if self._fastest <= 0 or speed <= 0:
            return lane.limit
        return max(1, min(lane.limit, int(lane.limit * speed / self._fastest)))

    def room(self, lane: Lane) -> int:
        return self.share(lane) - lane.load

    def pick(self, want: int, now: float, avoid: Collection[Lane] = ()) -> Lane | None:
        """The lane where (load + want) / speed is least, among those with room; a lane in `avoid`
        only if no other has room."""
        if now >= self._out_due:
            self._bring_back()
        self._expect(want)
        best, best_value, fallback, fallback_value = None, math.inf, None, math.inf
        seen: list[tuple[float, int, int, Lane]] = []
        # A key is (load + hint) / speed; a lane's value for this request is its key + (want - hint) /
        # speed, so nothing further down can beat the best once the next key + that term at its most
        # favourable speed is no lower (with want == hint: the first lane with room is the best).
        extra = want - self._hint
        bound = extra / ((self._fastest or self._default) if extra >= 0 else self._slowest)
        while self._heap:
            entry = self._heap[0]
            key, _, version, lane = entry
            if version != lane.version:
                heapq.heappop(self._heap)  # stale: the lane has a newer entry, or left
                continue
            if best is not None and key + bound >= best_value:
                break
            heapq.heappop(self._heap)
            if not lane.available(now) or lane.load >= self.share(lane):
                self._set_aside(lane, now)
                continue
            seen.append(entry)
            value = key + extra / self._speed_of(lane)
            if lane in avoid:
                if value < fallback_value:
                    fallback, fallback_value = lane, value
            elif value < best_value:
                best, best_value = lane, value
        for entry in seen:
            heapq.heappush(self._heap, entry)
        return best or fallback

    def _expect(self, want: int) -> None:
        """Keys count a request of the size most asked for (a prompt's samples; one in the tail):
        after HINT_MISSES requests of another size in a row, every key is made anew for it."""
        if want == self._hint:
            self._misses = 0
            return
        self._misses += 1
        if self._misses >= HINT_MISSES:
            self._hint, self._misses = want, 0
            self.reindex()

    # --- the index -------------------------------------------------------------------------------

    def _push(self, lane: Lane) -> None:
        lane.version += 1
        key = (lane.load + self._hint) / self._speed_of(lane)
        heapq.heappush(self._heap, (key, next(self._order), lane.version, lane))
        if len(self._heap) > 4 * len(self._lanes) + 64:
            self._compact()

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2] == entry[3].version]
        heapq.heapify(self._heap)

    def _set_aside(self, lane: Lane, now: float) -> None:
        """Full lanes come back when their load changes (`changed`); lanes that are out, when due."""
        if lane.left or lane.usable(now):
            return  # gone, or full: back when its load changes
        self._out.append(lane)
        due = lane.endpoint.open_until if lane.endpoint.open_until > now else now + OUT_RECHECK_S
        self._out_due = min(self._out_due, due)

    def _bring_back(self) -> None:
        out, self._out, self._out_due = self._out, [], math.inf
        for lane in out:
            self._push(lane)
