"""mvllmd's metrics: what the domain counts, through one small interface (`Events`).

The domain (the front door, the jobs, the endpoint table's listeners) calls an `Events` object as
things happen; it never imports prometheus_client. `prometheus.py` is the one module that does: its
`Metrics` keeps the counters and histograms behind these methods, and reads what already exists (the
instances, the requests in flight per server, the GPUs) when Prometheus scrapes, with collectors.
The front door serves it at `GET /metrics` (README, "Metrics", lists every metric). `door_totals`
reads the front door's counters back as plain totals (`mvllmctl top`): they are counted here only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DoorTotals:
    """The front door's requests since the daemon started, as the metrics counted them."""

    statuses: tuple[tuple[int, int], ...] = ()  # (status the client got, requests), by status
    retries: int = 0
    continued: int = 0
    stream_errors: int = 0

    @property
    def requests(self) -> int:
        return sum(count for _, count in self.statuses)

    @property
    def errors(self) -> int:
        """Requests whose client got a status of 400 or more."""
        return sum(count for status, count in self.statuses if status >= 400)


class Events:
    """What happened, as the domain tells it; this base counts nothing (tests, tools)."""

    def door_request(self, model: str, server: str, status: int, first_byte_s: float | None, total_s: float) -> None:
        """A front-door request ended: the server that answered last ("" if none did), the status the
        client got, the time to its first byte (None if none came) and in all."""

    def door_retry(self, model: str) -> None:
        """A front-door request was sent to another server before its answer began."""

    def door_continued(self, model: str) -> None:
        """A streamed answer cut mid-way went on on another server (once per choice continued)."""

    def door_stream_failed(self, model: str) -> None:
        """A streamed answer cut mid-way could not go on: the client got an error event and [DONE]."""

    def samples(self, model: str, done: int, errors: int, tokens: int) -> None:
        """A job wrote `done` samples, `errors` of them errors, with `tokens` completion tokens."""

    def door_totals(self) -> DoorTotals:
        """The front door's counts so far (this base counts nothing: none)."""
        return DoorTotals()


NO_EVENTS = Events()
