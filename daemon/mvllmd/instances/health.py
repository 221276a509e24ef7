"""Probing an engine over HTTP: ready, progressing, or hung. Low rate, so httpx (see the README).

A hung engine can keep answering /health with 200 (vLLM's API server is alive while its worker is
stuck), and its /metrics gauges may then read 0 running and 0 waiting. So progress is judged by the
token counters: when they have not moved for a while, a one-token probe request with a deadline
settles it. A busy engine moves its counters and is never probed, so a slow one is not taken for a
hung one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx

COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")


class Probed(Protocol):
    """What a prober needs of a server: an instance's spec, or an external server's."""

    @property
    def url(self) -> str: ...
    @property
    def served_model_name(self) -> str: ...


class Prober:
    def __init__(self, spec: Probed, api_key: str | None, timeout_s: float = 5.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._spec = spec
        self._client = httpx.AsyncClient(base_url=spec.url, headers=headers, timeout=timeout_s)

    async def close(self) -> None:
        await self._client.aclose()

    async def ready(self) -> tuple[bool, str]:
        """(True, "") once /health answers 200 and /v1/models lists the served model."""
        try:
            health = await self._client.get("/health")
            if health.status_code != 200:
                return False, f"/health answered {health.status_code}"
            models = await self._client.get("/v1/models")
            served = [m.get("id") for m in models.json().get("data", [])]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return False, f"not answering: {type(exc).__name__}"
        if self._spec.served_model_name not in served:
            return False, f"/v1/models lists {served}, not {self._spec.served_model_name!r}"
        return True, ""

    async def token_count(self) -> float | None:
        """Prompt plus generated tokens so far, from /metrics; None when it cannot be read."""
        try:
            response = await self._client.get("/metrics")
        except httpx.HTTPError:
            return None
        total, seen = 0.0, False
        for line in response.text.splitlines():
            if line.startswith(COUNTERS):
                try:
                    total += float(line.rsplit(" ", 1)[1])
                    seen = True
                except ValueError:
                    continue
        return total if seen else None

    async def probe(self, deadline_s: float) -> bool:
        """A one-token completion; True when it is answered within the deadline."""
        body = {"model": self._spec.served_model_name, "prompt": "ping", "max_tokens": 1}
        try:
            response = await self._client.post("/v1/completions", json=body, timeout=deadline_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200


@dataclass
class Progress:
    """Whether an engine made progress lately, remembered between looks: its token counters moved
    within `timeout_s`, or else a probe request is answered within half of it."""

    last_tokens: float | None = None
    last_progress: float = field(default_factory=time.monotonic)

    def made(self) -> None:
        self.last_progress = time.monotonic()

    async def check(self, prober: Prober, timeout_s: float) -> tuple[bool, str]:
        tokens = await prober.token_count()
        now = time.monotonic()
        if tokens is not None and tokens != self.last_tokens:
            self.last_tokens, self.last_progress = tokens, now
            return True, ""
        if now - self.last_progress < timeout_s:
            return True, ""
        if await prober.probe(deadline_s=timeout_s / 2):
            self.made()
            return True, ""
        return False, f"no progress for {now - self.last_progress:.0f}s and a probe request went unanswered"
