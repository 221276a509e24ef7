"""A circuit breaker for one server: taken out after failures in a row, let back in with one request.

Closed, it counts retryable failures in a row (connection errors, timeouts, 429, 5xx; slow answers
never count: long generations are normal). At `failures` it opens for a cooldown. When the cooldown
has passed it is half-open: one request may go (the endpoint sends one while nothing else of ours
runs there). A success closes it and resets the cooldown; a failure of that probe opens it again for
twice the cooldown, up to MAX_COOLDOWN_S. Requests sent before it opened that fail afterwards say
nothing new (a server that died with 8 requests in flight fails all 8 at once): they neither count nor
double the cooldown. Each change of state is logged once, by the endpoint that owns the breaker.
"""

from __future__ import annotations

import enum

MAX_COOLDOWN_S = 60.0


class Change(enum.Enum):
    """What a call did to the breaker, for the one log line each change gets."""

    NONE = "none"
    OPENED = "opened"  # failures in a row reached the threshold
    REOPENED = "reopened"  # the probe failed: out again, for twice as long
    CLOSED = "closed"  # back in after a cooldown


class Breaker:
    def __init__(self, failures: int, cooldown_s: float) -> None:
        self._threshold = failures
        self._base_s = cooldown_s
        self._in_a_row = 0
        self.cooldown_s = 0.0  # the current cooldown; 0 while closed and never opened since a success
        self.open_until = 0.0  # out until then (monotonic); 0 while closed
        self._opened_at = float("-inf")

    @property
    def is_open(self) -> bool:
        """Opened and not yet closed again by a success (half-open included)."""
        return self.open_until > 0

    def allows(self, now: float, busy: bool) -> bool:
        """Whether a request may go now; half-open, only while nothing else is in flight (`busy`)."""
        return not self.is_open or (now >= self.open_until and not busy)

    def succeeded(self) -> Change:
        was_open = self.is_open
        self._in_a_row, self.cooldown_s, self.open_until = 0, 0.0, 0.0
        return Change.CLOSED if was_open else Change.NONE

    def failed(self, started: float, now: float) -> Change:
        """A retryable failure of a request sent at `started`."""
        if started < self._opened_at:
            return Change.NONE  # sent before it was taken out: nothing new about the server
        if self.is_open:  # sent since: the probe
            self._open(now, min(MAX_COOLDOWN_S, max(self.cooldown_s * 2, self._base_s)))
            return Change.REOPENED
        self._in_a_row += 1
        if self._in_a_row < self._threshold:
            return Change.NONE
        self._open(now, min(MAX_COOLDOWN_S, max(self.cooldown_s * 2, self._base_s)))
        return Change.OPENED

    def take_out(self, now: float, at_least_s: float) -> None:
        """Out now, for twice the last cooldown and at least `at_least_s` (a server that hung)."""
        self._open(now, max(self.cooldown_s * 2, at_least_s))

    def _open(self, now: float, cooldown_s: float) -> None:
        self.cooldown_s = cooldown_s
        self.open_until = now + cooldown_s
        self._opened_at = now
        self._in_a_row = 0
