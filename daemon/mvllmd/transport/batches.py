"""Short requests that leave for one server in the same turn of the loop travel as one.

A job of short samples (8 tokens, one sample a prompt) spends most of its CPU on what each request
costs whatever it asks for: the request's head, its write, the answer's read and parse, on the
daemon's side, at the server, and twice more through a peer's per-instance route (its relay, and
TLS on both ends). vLLM's /v1/completions takes a list of prompts in one request, each with its own n
choices (choice k is prompt k // n's sample k % n), so the requests of one job that the dispatcher
sends to the same server in one turn go as one request of several prompts, and each gets its own
samples back. The dispatcher sees nothing of it: it picks a server for each prompt, counts its
samples in flight and takes them back one prompt at a time, as before.

Only where that cannot change what a job gets:

- a prompt string (/v1/chat/completions takes one conversation a request);
- unseeded: a batch's prompts would share one seed, while each prompt has its own (requests.py);
- not streamed and not a moved sample's continuation (each has its own body and stream);
- at most BATCH_MAX_TOKENS a sample: a batch's answer comes when its longest sample ends, so the
  samples of its other prompts are held that long, and a long-tailed job's places would be held by
  finished samples; for short ones the wait is a few decode steps;
- prompts of at most BATCH_MAX_PROMPT_CHARS: each prompt's own counts must come back, and a batch's
  usage sums every prompt's tokens, so it asks for the token ids (return_token_ids, as a request with
  n > 1 does), which bring the prompt's ids back too.

A batch's prompts share its fate only where that is right: an answer that cannot be read, a 5xx or
a timeout is each prompt's (each goes back to be sent again, as alone; the server's breaker hears of
one failed request, not one for each prompt); a 4xx (one prompt too long
for the model, say) is tried again one prompt a request, so that each prompt gets its own answer. A
prompt whose request is cancelled (a hung server's requests sent elsewhere, a copy that lost) leaves
the batch; the batch is cancelled when none is left.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mvllm.jobs import Sample, Sampling
from mvllmd.transport import http
from mvllmd.transport.requests import (
    ABORTED,
    RETRYABLE_STATUS,
    RequestFailed,
    build_body,
    error_text,
    json_headers,
    samples_of,
    send,
)
from mvllmd.transport.streams import Prefix, Stream

BATCH_MAX_TOKENS = 64  # samples of at most this many tokens may share a request
BATCH_MAX_PROMPT_CHARS = 4096  # and prompts of at most this many characters (their ids come back)
BATCH_MOST = 32  # prompts a request at most


@dataclass
class _Member:
    prompt: str
    prompt_index: int
    sample_indexes: Sequence[int]
    answer: asyncio.Future[list[Sample]]


@dataclass
class _Batch:
    endpoint: str
    api_key: str
    n: int
    timeout_s: float | None
    members: list[_Member] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


def batchable(sampling: Sampling) -> bool:
    """Whether a job's requests may share a request with others (see the module's docstring)."""
    return sampling.seed is None and sampling.max_tokens is not None and sampling.max_tokens <= BATCH_MAX_TOKENS


class Batches:
    """A job's requests on their way, grouped by server until the loop's next turn."""

    def __init__(self, client: http.Client, model: str, sampling: Sampling) -> None:
        self._http, self._model, self._sampling = client, model, sampling
        self._enabled = batchable(sampling)
        self._open: dict[tuple[str, int, str], _Batch] = {}
        self._running: set[asyncio.Task[None]] = set()

    async def send(  # noqa: PLR0917  (requests.send's arguments)
        self,
        endpoint: str,
        prompt: str | list[dict[str, str]],
        prompt_index: int,
        sample_indexes: Sequence[int],
        timeout_s: float | None,
        api_key: str = "",
        *,
        stream: Stream | None = None,
        prefix: Prefix | None = None,
    ) -> list[Sample]:
        """requests.send, for a request that may travel with others of this job to the same server."""
        if not self._enabled or stream or prefix or not isinstance(prompt, str) or len(prompt) > BATCH_MAX_PROMPT_CHARS:
            return await send(self._http, endpoint, self._model, self._sampling, prompt, prompt_index,
                              sample_indexes, timeout_s, api_key, stream=stream, prefix=prefix)  # fmt: skip
        loop = asyncio.get_running_loop()
        member = _Member(prompt, prompt_index, sample_indexes, loop.create_future())
        key = (endpoint, len(sample_indexes), api_key)
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch(endpoint, api_key, len(sample_indexes), timeout_s)
            loop.call_soon(self._close, key, batch)  # after the other requests sent in this turn
        batch.members.append(member)
        if len(batch.members) >= BATCH_MOST:
            self._close(key, batch)
        try:
            return await member.answer
        except asyncio.CancelledError:
            if batch.task is not None and all(m.answer.done() for m in batch.members):
                batch.task.cancel()  # nobody waits for its answer: the server may stop its work
            raise

    def close(self) -> None:
        for task in self._running:
            task.cancel()

    def _close(self, key: tuple[str, int, str], batch: _Batch) -> None:
        """No more members: send it (once)."""
        if self._open.get(key) is batch:
            del self._open[key]
        if batch.task is None:
            batch.task = asyncio.get_running_loop().create_task(self._fly(batch))
            self._running.add(batch.task)
            batch.task.add_done_callback(self._running.discard)

    async def _fly(self, batch: _Batch) -> None:
        members = [m for m in batch.members if not m.answer.done()]
        try:
            await self._answer(batch, members)
        finally:  # cancelled (close()): whoever still waits is cancelled too, never left waiting
            for m in members:
                if not m.answer.done():
                    m.answer.cancel()

    async def _answer(self, batch: _Batch, members: list[_Member]) -> None:
        if len(members) <= 1:
            await asyncio.gather(*(self._alone(batch, m) for m in members))
            return
        try:
            answers = await self._together(batch, members)
        except RequestFailed as exc:
            if not exc.retryable:  # one prompt too long, say: each prompt gets its own answer
                await asyncio.gather(*(self._alone(batch, m) for m in members))
                return
            for i, m in enumerate(members):
                _settle(m, exc=exc if i == 0 else RequestFailed(str(exc), retryable=True, counted=False))
            return
        for m, samples in zip(members, answers, strict=True):
            _settle(m, samples)

    async def _alone(self, batch: _Batch, m: _Member) -> None:
        try:
            samples = await send(self._http, batch.endpoint, self._model, self._sampling, m.prompt, m.prompt_index,
                                 m.sample_indexes, batch.timeout_s, batch.api_key)  # fmt: skip
        except RequestFailed as exc:
            _settle(m, exc=exc)
        else:
            _settle(m, samples)

    async def _together(self, batch: _Batch, members: list[_Member]) -> list[list[Sample]]:
        fields = build_body(self._model, self._sampling, "", batch.n, None)
        fields.update(prompt=[m.prompt for m in members], return_token_ids=True)
        started = time.monotonic()
        try:
            async with asyncio.timeout(batch.timeout_s):
                response = await self._http.pool(batch.endpoint).post(
                    "/v1/completions", json.dumps(fields).encode(), json_headers(batch.api_key)
                )
            if response.status != 200:
                raise RequestFailed(error_text(response), response.status in RETRYABLE_STATUS)
            answers = self._split(json.loads(response.body), batch, members, time.monotonic() - started)
        except (TimeoutError, OSError, http.HttpError, ValueError) as exc:
            raise RequestFailed(f"{type(exc).__name__}: {exc}"[:300], retryable=True) from exc
        if any(s.finish_reason == ABORTED for samples in answers for s in samples):
            raise RequestFailed(f"{batch.endpoint} aborted the request", retryable=True)
        return answers

    def _split(self, answer: Any, batch: _Batch, members: list[_Member], latency: float) -> list[list[Sample]]:
        """Each prompt's samples from a batched answer: choice k is prompt k // n's sample k % n, and
        the prompt's tokens are its choices' prompt_token_ids."""
        try:
            choices = sorted(answer["choices"], key=lambda c: c["index"])
        except (KeyError, TypeError) as exc:
            raise RequestFailed(f"malformed answer from {batch.endpoint}: {exc!r}", retryable=True) from exc
        if len(choices) != batch.n * len(members):
            raise RequestFailed(
                f"{batch.endpoint} answered {len(choices)} choices for {len(members)} prompts of n={batch.n}", True
            )
        out = []
        for i, m in enumerate(members):
            own = choices[i * batch.n : (i + 1) * batch.n]
            ids = own[0].get("prompt_token_ids") if isinstance(own[0], dict) else None
            if not isinstance(ids, list):
                raise RequestFailed(f"malformed answer from {batch.endpoint}: no prompt_token_ids", retryable=True)
            own_answer = {"choices": own, "usage": {"prompt_tokens": len(ids)}}
            out.append(samples_of(own_answer, batch.endpoint, self._sampling, m.prompt_index, m.sample_indexes,
                                  None, latency))  # fmt: skip
        return out


def _settle(member: _Member, samples: list[Sample] | None = None, exc: RequestFailed | None = None) -> None:
    """The member's answer, unless it left (its request was cancelled)."""
    if member.answer.done():
        return
    if exc is not None:
        member.answer.set_exception(exc)
    else:
        member.answer.set_result(samples or [])
