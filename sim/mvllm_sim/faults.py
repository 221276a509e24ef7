"""Fault injection: crash, hang, dropped connections, error answers and a slow start.

From flags (the whole server) or, for targeted tests, from the `X-Mvllm-Fault` request header:
    crash               the process dies at once (exit status 70), without answering
    hang                this request is accepted and never answered
    drop                the connection is closed before the answer (after the first chunk when streaming)
    drop-after=K        streaming: close the connection after K chunks
    status=CODE         answer CODE (429, 500 or 503) in vLLM's error envelope
--fail-reloads makes every weights reload (/collective_rpc reload_weights) fail as vLLM's does when
its loader fails (500, and the weights stay as they were). And, for a fault at a moment of the
caller's choosing, SIGUSR1: the engine stops stepping from then on
(as vLLM whose worker stopped: /health and /metrics still answer, the latter with its running and
waiting gauges frozen as they were; nothing is made again). --hang-after-requests hangs it the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mvllm_sim.protocol import ApiError

HEADER = "X-Mvllm-Fault"
CRASH_EXIT_STATUS = 70
ERROR_STATUSES = (429, 500, 503)
ERROR_TYPES = {429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


@dataclass(frozen=True)
class FaultConfig:
    crash_after_requests: int | None = None  # die when request K+1 arrives
    crash_at_s: float | None = None  # die when the simulated clock passes this
    hang_after_requests: int | None = None  # the engine stops stepping after K requests arrived
    drop_rate: float = 0.0  # share of requests whose connection is closed mid-answer
    error_rate: float = 0.0  # share of requests answered with error_status
    error_status: int = 503
    startup_delay_s: float = 0.0  # not ready for this long after start
    startup_mode: str = "health-503"  # or "refuse": the port is not open until then
    fault_seed: int = 0
    fail_reloads: bool = False  # every weights reload fails (the weights stay)


@dataclass(frozen=True)
class RequestFault:
    """What happens to one request."""

    crash: bool = False
    hang: bool = False
    drop_after_chunks: int | None = None  # 0: before anything is sent
    status: int | None = None


@dataclass
class FaultPlan:
    config: FaultConfig
    requests_seen: int = 0
    hung_by_signal: bool = False  # SIGUSR1 came: the engine is stuck for good
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.config.fault_seed)

    def for_request(self, header: str | None) -> RequestFault:
        """Count the request and decide its fault: the header wins over the rates."""
        self.requests_seen += 1
        c = self.config
        if c.crash_after_requests is not None and self.requests_seen > c.crash_after_requests:
            return RequestFault(crash=True)
        if header:
            return parse_header(header)
        if c.error_rate and self._rng.random() < c.error_rate:
            return RequestFault(status=c.error_status)
        if c.drop_rate and self._rng.random() < c.drop_rate:
            return RequestFault(drop_after_chunks=1)
        return RequestFault()

    @property
    def engine_hung(self) -> bool:
        limit = self.config.hang_after_requests
        return self.hung_by_signal or (limit is not None and self.requests_seen >= limit)


def parse_header(value: str) -> RequestFault:
    word, _, arg = value.strip().partition("=")
    if word == "crash":
        return RequestFault(crash=True)
    if word == "hang":
        return RequestFault(hang=True)
    if word == "drop":
        return RequestFault(drop_after_chunks=1)
    if word == "drop-after" and arg.isdigit():
        return RequestFault(drop_after_chunks=int(arg))
    if word == "status" and arg.isdigit() and int(arg) in ERROR_STATUSES:
        return RequestFault(status=int(arg))
    raise ApiError(400, f"{HEADER}: unknown fault {value!r}; use crash, hang, drop, drop-after=K or status=CODE")


def error_for(status: int) -> ApiError:
    return ApiError(status, f"injected fault: HTTP {status}", ERROR_TYPES.get(status, "InternalServerError"))
