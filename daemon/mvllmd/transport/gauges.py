"""What a server says of its own load: vLLM's Prometheus /metrics, read while a job runs.

`parse` reads the exposition text and sums each wanted metric over its label sets (vLLM labels its
gauges by engine and model: `vllm:num_requests_waiting{engine="0",model_name="m"} 3.0`). `scrape`
fetches one endpoint's /metrics over the job's own keep-alive connections (http.py). `Gauges` keeps
the latest reading of one endpoint and what follows from two readings: the server's generation rate
(tokens/s) and the time each running sequence takes per token (its decode step, which grows with
the batch), and since when its token counters (prompt and generated) have stood still, which
tells a hung server from a busy one (endpoint.py). A server without /metrics, or one that answers
badly, simply has no gauges (`ok` is False); `failed_since` says since when, if it had some before.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from mvllmd.transport import http
from mvllmd.transport.requests import bearer

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
GENERATED = "vllm:generation_tokens_total"
PROMPT = "vllm:prompt_tokens_total"
WANTED = (RUNNING, WAITING, GENERATED, PROMPT)
RATE_WEIGHT = 0.3  # of a new reading in the smoothed rate: one interval's rate is noisy (when it was read)


def parse(text: str, names: tuple[str, ...] = WANTED) -> dict[str, float]:
    """The sum over label sets of each metric in `names` that the text holds."""
    found: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith(names):
            continue  # most lines: other metrics, comments (a cheap test first; the metric's own pages are long)
        cuts = [i for i in (line.find("{"), line.find(" ")) if i > 0]
        if line.startswith("#") or not cuts or line[: min(cuts)] not in names:
            continue
        name, rest = line[: min(cuts)], line[min(cuts) :]
        if rest.startswith("{"):
            rest = rest[_label_end(rest) + 1 :]
        value = _value(rest)
        if value is not None:
            found[name] = found.get(name, 0.0) + value
    return found


def _label_end(text: str) -> int:
    """The index of the `}` that closes a label set (label values may hold escaped quotes and braces)."""
    quoted = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "}" and not quoted:
            return i
    return len(text)


def _value(rest: str) -> float | None:
    fields = rest.split()
    if not fields:
        return None
    try:
        value = float(fields[0])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


async def scrape(client: http.Client, url: str, api_key: str = "", timeout_s: float = 2.0,
                 names: tuple[str, ...] = WANTED) -> dict[str, float]:  # fmt: skip
    """One endpoint's gauges in `names`; raises http.HttpError, OSError, TimeoutError or ValueError."""
    async with asyncio.timeout(timeout_s):
        response = await client.pool(url).get("/metrics", bearer(api_key) or {})
    if response.status != 200:
        raise ValueError(f"/metrics answered HTTP {response.status}")
    values = parse(response.body.decode(), names)  # (a UnicodeDecodeError is a ValueError)
    if RUNNING not in values or WAITING not in values:
        raise ValueError("/metrics has no vLLM request gauges")
    return values


@dataclass
class Gauges:
    """The latest reading of one endpoint's /metrics and the rates between the last two."""

    ok: bool = False
    running: float = 0.0
    waiting: float = 0.0
    at: float = 0.0
    tokens_per_s: float = 0.0  # the whole server's generation rate, every client's
    smooth_tokens_per_s: float = 0.0  # the rate, smoothed over readings (RATE_WEIGHT each)
    peak_tokens_per_s: float = 0.0  # the highest smoothed rate seen: what the server does with a full batch
    step_s: float = 0.0  # seconds per token of one running sequence; 0 until measured
    min_step_s: float = 0.0  # the fastest seen: the server's step with a small batch
    waiting_polls: int = 0  # readings in a row with requests waiting
    still_since: float = 0.0  # the reading that first showed the token counters as they are now
    failed_since: float = 0.0  # readings have failed since then, after some worked; 0: they work, or never did
    _generated: float = -1.0
    _tokens: float = -1.0  # prompt and generated tokens, the counters that move while the server works

    def update(self, values: dict[str, float], now: float) -> None:
        running, generated = values[RUNNING], values.get(GENERATED, -1.0)
        tokens = generated + values.get(PROMPT, 0.0)
        if not self.ok or tokens != self._tokens:
            self.still_since = now
        self._tokens, self.failed_since = tokens, 0.0
        if generated >= self._generated >= 0 and now > self.at:  # since the last reading that worked
            self.tokens_per_s = (generated - self._generated) / (now - self.at)
            smooth = self.smooth_tokens_per_s
            self.smooth_tokens_per_s = (
                self.tokens_per_s if smooth == 0 else smooth + RATE_WEIGHT * (self.tokens_per_s - smooth)
            )
            self.peak_tokens_per_s = max(self.peak_tokens_per_s, self.smooth_tokens_per_s)
            busy = (running + self.running) / 2
            if busy >= 1 and self.tokens_per_s > 0:
                self.step_s = busy / self.tokens_per_s
                self.min_step_s = min(self.min_step_s or self.step_s, self.step_s)
        self.ok, self.running, self.waiting, self.at, self._generated = True, running, values[WAITING], now, generated
        self.waiting_polls = self.waiting_polls + 1 if self.waiting > 0 else 0

    def fail(self, now: float) -> None:
        """A reading failed. The last counter is kept: the next reading's rate spans the gap, so that a
        machine whose readings often time out (a loaded one) still measures its servers' rates."""
        if self.ok:
            self.failed_since = now
        self.ok, self.step_s, self.waiting_polls = False, 0.0, 0
