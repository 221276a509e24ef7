"""One job's work waiting to be sent, and the backpressure on whoever feeds it.

Three lines: work sent again or put back (first), the queue of new work (in input order), and retries
waiting out their backoff (a heap by when they are due). `take` hands out the next work with samples
still to do: seeded, only a contiguous run of them (vLLM gives choice i of a request the request's
seed + i: see transport/requests.py), the rest put back; in the tail of a balancing policy, one sample,
the rest put back to be spread. `cut` makes work fit the room there is. The feeder waits in `room`
until the backlog has fallen to what it may hold: memory does not grow with the input.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import math
from collections.abc import Callable

from mvllmd.dispatch.flights import Work


class Backlog:
    def __init__(self, is_done: Callable[[int, int], bool], seeded: bool) -> None:
        self._is_done = is_done
        self._seeded = seeded
        self._queue: collections.deque[Work] = collections.deque()
        self._again: collections.deque[Work] = collections.deque()
        self._delayed: list[tuple[float, int, Work]] = []
        self._order = itertools.count()
        self._low = asyncio.Event()  # the backlog fell to `_low_mark`
        self._low_mark = 0
        self.asked = 0  # samples added to the queue
        self.input_done = False
        self.closed = False  # nothing more will be taken: the feeder stops waiting

    def __len__(self) -> int:
        return len(self._queue) + len(self._again) + len(self._delayed)

    @property
    def in_tail(self) -> bool:
        """The input is closed and every new item was taken: what is left is retries and the rest."""
        return self.input_done and not self._queue

    @property
    def next_due(self) -> float:
        """When the first retry waiting out its backoff is due (inf: none waits)."""
        return self._delayed[0][0] if self._delayed else math.inf

    def add(self, work: Work) -> None:
        self._queue.append(work)
        self.asked += len(work.samples)

    def again(self, work: Work) -> None:
        """Work to send first (a hung server's, or what was cut off a request)."""
        self._again.appendleft(work)

    def later(self, work: Work, due: float) -> None:
        heapq.heappush(self._delayed, (due, next(self._order), work))

    def take(self, now: float, split_tail: bool) -> Work | None:
        """The next work with samples to do; with `split_tail`, in the tail, one sample of it."""
        while self._delayed and self._delayed[0][0] <= now:
            self._again.append(heapq.heappop(self._delayed)[2])
        source = self._again or self._queue
        while source:
            work = source.popleft()
            work.samples = [s for s in work.samples if not self._is_done(work.prompt_index, s)]
            if work.samples and self._seeded:
                self._contiguous(work)
            if work.samples:
                if split_tail and self.in_tail and len(work.samples) > 1:
                    for s in work.samples[1:]:
                        self._again.append(Work(work.prompt_index, work.prompt, [s], work.attempts))
                    work.samples = work.samples[:1]
                return work
            source = self._again or self._queue
        return None

    def cut(self, work: Work, room: int) -> Work:
        """At most `room` samples of `work` (at least one); the rest is put back first."""
        if len(work.samples) <= room or room < 1:
            return work
        self.again(Work(work.prompt_index, work.prompt, work.samples[room:], work.attempts))
        return Work(work.prompt_index, work.prompt, work.samples[:room], work.attempts, work.last_error)

    def _contiguous(self, work: Work) -> None:
        """Seeded, a request asks for a run of consecutive samples (its choice i has the seed of its
        first plus i): the samples after the first gap wait for a request of their own."""
        run = next((i for i in range(1, len(work.samples)) if work.samples[i] != work.samples[i - 1] + 1), None)
        if run is not None:
            self.again(Work(work.prompt_index, work.prompt, work.samples[run:], work.attempts))
            work.samples = work.samples[:run]

    # --- backpressure ----------------------------------------------------------------------------

    async def room(self, most: int) -> None:
        """Wait until at most `most` items wait to be sent, or nothing more will be taken."""
        while len(self) > most and not self.closed:
            self._low_mark = most
            self._low.clear()
            await self._low.wait()

    def taken(self) -> None:
        """Work was taken: wake the feeder if the backlog fell low enough."""
        if len(self) <= self._low_mark:
            self._low.set()

    def close(self, drop: bool) -> None:
        """Nothing more will be taken (the job stops, or its dispatcher ended); `drop` forgets the work."""
        if drop:
            self._queue.clear()
            self._again.clear()
            self._delayed.clear()
        self.input_done = self.closed = True
        self._low.set()
