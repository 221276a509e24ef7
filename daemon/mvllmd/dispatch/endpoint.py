"""One server as the daemon knows it, shared by every job (and every other user) that sends to it.

An Endpoint holds what is true of the server whoever asks: its batch limit in effect, its speed, its
breaker, its hang watch, the gauges its /metrics last showed, other clients' load there, and how many
of our samples are in flight there in all. What is one job's (its own requests there, its counts) is
that job's `Lane` (flights.py). Everything here changes through methods; nothing outside writes it.

- limit: the server's max_num_seqs at first. A server that keeps requests waiting (WAITING_POLLS
  readings in a row) is allowed less, down to what it runs; with none waiting it grows back.
- external: sequences running or waiting there beyond ours, from its gauges: other clients' load.
- seen: what it runs and queues by its gauges, and ours sent since: a job's lane counts that where it
  is less than the samples in flight (a request not streamed holds its finished choices' places
  until its last ends).
- the front door's reserve: jobs share the limit less what they leave free for the front door while
  it uses the server (a request in flight there, or one in the last DOOR_IDLE_S): `door_reserve` of
  its capacity (at least one sequence), or the front door's requests there if more. So an agent's
  request is never queued behind a job's samples; and a server the front door does not use gives the
  jobs all of its limit.
- speed: the samples it completed per second, smoothed (half-life SPEED_HALF_LIFE_S); and, from the
  gauges, its peak generation rate (tokens/s), the better measure once every server has shown one.
- hang watch: a server is hung when, with requests of ours in flight and none of them answered:
  - its /metrics shows its token counters (prompt and generated) standing still for `stall_s`: a
    vLLM engine publishes them at each step, and one whose worker stopped publishes nothing (its
    running and waiting gauges freeze as they were). A busy server steps many times a second; on a
    starved CPU the real vLLM CPU build made no token for 7 s while it counted one of our 23 requests,
    so `stall_s` is 10 s, not less;
  - its /metrics, which answered before, has not answered for SILENT_STALLS x `stall_s`;
  - or, the fallback for a server without /metrics, nothing completed for the hang timeout.
  Each span counts from the later of its last completion and the moment it last became busy. A
  busy server's counters move with every step, so a stall of seconds is news: a hang is found in
  about `stall_s`, not the minutes of the timeout.
- weights (weights/state.py, its instance's, shared): the version of the weights it serves, by
  which the tokens read from it are labelled; `held` while an update pauses it or it sleeps:
  nothing new is sent to it (the front door's last resort aside), and it is not judged hung.
"""

from __future__ import annotations

import logging
import math
import sys
import time

from mvllmd.dispatch.breaker import Breaker, Change
from mvllmd.transport.gauges import Gauges
from mvllmd.weights.state import Weights

log = logging.getLogger(__name__)

SPEED_HALF_LIFE_S = 10.0
WAITING_POLLS = 3  # readings in a row with requests waiting before a server is sent less
STALL_S = 10.0  # token counters still this long, with requests of ours there and none answered: hung
SILENT_STALLS = 3  # its /metrics silent this many stall spans (it answered before): hung
DOOR_IDLE_S = 60.0  # the front door's reserve on a server holds this long after its last request there
UNSEEN = sys.maxsize  # Endpoint.seen while no reading of its gauges works


class Endpoint:
    def __init__(self, url: str, capacity: int, api_key: str = "", *, failures: int = 5, cooldown_s: float = 2.0,
                 stall_s: float = STALL_S, door_reserve: float = 0.0, weights: Weights | None = None):  # fmt: skip
        self.url = url  # base URL, without /v1
        self.api_key = api_key
        self.capacity = capacity  # max_num_seqs: the samples it can run at once
        self.limit = capacity  # the capacity in effect: lowered while the server queues what it is sent
        self.gauges = Gauges()
        self.external = 0  # sequences on the server that are not ours, from its gauges
        self.inflight = 0  # our samples in flight there, every job's and the front door's
        self.door_inflight = 0  # the front door's part of them
        self.speed = 0.0  # samples per second, smoothed; 0 until measured
        self.latency_s = 0.0  # a request's time from sent to answered, smoothed; 0 until measured
        self.users = 0  # the jobs that send to it now: each may hold an equal share of the limit
        self.doors = 0  # the front door's models that send to it: they take no share (requests count in inflight)
        self.trips = 0  # its breaker opened (failures in a row, or a failed probe), times since it was joined
        self.hangs = 0  # it was taken out as hung, times since it was joined
        self.weights = weights or Weights()
        self._breaker = Breaker(failures, cooldown_s)
        self._stall_s = stall_s
        self._door_reserve = door_reserve
        self._door_at = 0.0  # the front door's last request here
        self._door_active = False  # its reserve holds
        now = time.monotonic()
        self._last_completion = now
        self._busy_since = now
        self._speed_at = now
        self._inflight_at_poll = 0
        self._sent_since_poll = 0  # our samples sent there since its last reading began
        # Sequences the server runs or queues by its gauges: what they showed at the last reading, and
        # ours sent since (UNSEEN while no reading works). Our in-flight count says more than it runs:
        # a request's samples count until the whole request is back, the finished choices of one not
        # streamed among them (in the balance benchmark a fast server counted 1,024 and ran 600).
        self.seen = UNSEEN

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, inflight={self.inflight}, limit={self.limit})"

    # --- what the dispatcher asks -----------------------------------------------------------------

    @property
    def load(self) -> int:
        """Sequences on the server: ours in flight, and other clients' as its gauges last said."""
        return self.inflight + self.external

    @property
    def out(self) -> bool:
        """Taken out by its breaker (a cooldown, or half-open waiting for its one request)."""
        return self._breaker.is_open

    @property
    def open_until(self) -> float:
        return self._breaker.open_until

    def usable(self, now: float) -> bool:
        """Not held, and its breaker lets a request go now."""
        return not self.weights.held and self._breaker.allows(now, busy=self.inflight > 0)

    def share(self) -> int:
        """The part of its limit one job may hold: an equal part of what the front door leaves."""
        return max(1, (self.limit - self.kept()) // max(1, self.users))

    def kept(self) -> int:
        """The sequences jobs leave free for the front door (see the module docstring)."""
        if not self._door_active:
            return 0
        reserve = max(1, math.ceil(self.capacity * self._door_reserve)) if self._door_reserve > 0 else 0
        return min(self.limit - 1, max(reserve, self.door_inflight))

    # --- what happens to it ---------------------------------------------------------------------

    def sent(self, samples: int, door: bool = False) -> None:
        if self.inflight == 0:
            self._busy_since = time.monotonic()
        self.inflight += samples
        self._sent_since_poll += samples
        self.seen += samples
        if door:
            self.door_inflight += samples
            self._door_at, self._door_active = time.monotonic(), True

    def landed(self, samples: int, door: bool = False) -> None:
        self.inflight -= samples
        if door:
            self.door_inflight -= samples

    def tick(self, now: float) -> None:
        """The front door's reserve ends when none of its requests is here and none came for DOOR_IDLE_S."""
        if self._door_active and self.door_inflight == 0 and now - self._door_at > DOOR_IDLE_S:
            self._door_active = False

    def succeeded(self, samples: int, took_s: float, now: float) -> None:
        self._last_completion = now
        self._record_speed(samples, now)
        self.latency_s = took_s if self.latency_s == 0 else 0.9 * self.latency_s + 0.1 * took_s
        if self._breaker.succeeded() is Change.CLOSED:
            log.info("endpoint %s answers again; back in", self.url)

    def failed(self, started: float, now: float) -> None:
        """A retryable failure of a request sent at `started`; the breaker decides what it means."""
        change = self._breaker.failed(started, now)
        if change in {Change.OPENED, Change.REOPENED}:
            self.trips += 1
        if change is Change.OPENED:
            log.warning("endpoint %s taken out for %.0fs after repeated failures", self.url, self._breaker.cooldown_s)
        elif change is Change.REOPENED:
            log.warning("endpoint %s still fails; taken out for %.0fs", self.url, self._breaker.cooldown_s)

    def hung(self, now: float, timeout_s: float) -> str:
        """Why it is hung (see the module docstring), or "" when it is not."""
        if self.inflight == 0 or self._breaker.is_open or self.weights.held:
            return ""
        waited = max(self._last_completion, self._busy_since)  # ours have waited since, none answered
        g, stall = self.gauges, self._stall_s
        if g.ok:
            still = g.at - max(g.still_since, waited)
            if still >= stall:
                return (f"its /metrics shows no token made for {still:.0f}s while {self._inflight_at_poll} "
                        f"requests of ours were there (it runs {g.running:.0f}, queues {g.waiting:.0f})")  # fmt: skip
        elif g.failed_since and now - max(g.failed_since, waited) >= SILENT_STALLS * stall:
            return f"its /metrics has not answered for {now - g.failed_since:.0f}s with requests of ours there"
        if now - waited > timeout_s:
            return f"it completed nothing for {now - waited:.0f}s with requests in flight"
        return ""

    def take_out_hung(self, now: float, timeout_s: float, why: str) -> None:
        """Hung: out for at least the hang timeout; judged afresh on what it is sent when back."""
        log.warning("endpoint %s: %s; treating it as hung", self.url, why)
        self.hangs += 1
        self._breaker.take_out(now, timeout_s)
        self._last_completion = now

    def released(self) -> None:
        """Its hold ended (weights/updates.py): the pause does not count as a stall."""
        self._last_completion = time.monotonic()

    def join(self, capacity: int, shares: bool = True) -> None:
        """A user starts sending to it: a job (`shares` its limit with the other jobs) or the front door."""
        if shares:
            self.users += 1
        else:
            self.doors += 1
        if capacity != self.capacity:
            lowered = self.limit < self.capacity
            self.capacity = capacity
            self.limit = min(self.limit, capacity) if lowered else capacity

    def leave(self, shares: bool = True) -> None:
        if shares:
            self.users = max(0, self.users - 1)
        else:
            self.doors = max(0, self.doors - 1)

    @property
    def used(self) -> bool:
        return self.users + self.doors > 0

    # --- its gauges ------------------------------------------------------------------------------

    def polling(self) -> None:
        """A reading of its /metrics starts: our in-flight count now is what it will be compared with."""
        self._inflight_at_poll = self.inflight
        self._sent_since_poll = 0

    def since_poll(self) -> int:
        """Our samples sent there since its last reading began, less those that landed."""
        return self.inflight - self._inflight_at_poll

    def read(self, values: dict[str, float], now: float) -> None:
        """Follow the server's gauges: other clients' sequences count as load; a server that keeps
        requests waiting is allowed less, down to what it runs; one with none waiting grows back."""
        g = self.gauges
        g.update(values, now)
        self.external = max(0, int(g.running + g.waiting) - self._inflight_at_poll)
        self.seen = int(g.running + g.waiting) + self._sent_since_poll
        if g.waiting_polls >= WAITING_POLLS:
            runs = max(1, int(g.running))
            self.limit = min(self.limit, max(runs, (self.limit + runs) // 2))
        elif g.waiting == 0 and self.limit < self.capacity:
            self.limit = min(self.capacity, self.limit + max(1, self.limit // 4))

    def unreadable(self) -> None:
        """Its /metrics failed: no gauges, and no outside load, until a reading works again."""
        self.gauges.fail(time.monotonic())
        self.external = 0
        self.seen = UNSEEN

    def _record_speed(self, samples: int, now: float) -> None:
        elapsed = max(1e-3, now - self._speed_at)
        rate = samples / elapsed
        weight = 0.5 ** (elapsed / SPEED_HALF_LIFE_S)
        self.speed = rate if self.speed == 0 else weight * self.speed + (1 - weight) * rate
        self._speed_at = now
