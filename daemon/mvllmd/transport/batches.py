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

A batch's prompts share its fate only where that is right: a 5xx, a timeout or a cut connection is
each prompt's (each goes back to be sent again, as alone; the server's breaker hears of one failed
request, not one for each prompt). A 4xx (one prompt too long for the model, say) is tried again one
prompt a request, so that each prompt gets its own answer. A server that is not vLLM may take no list
of prompts, or answer one without the token ids: where a batch is refused while its prompts alone are
answered, or its answer lacks a choice or a prompt's ids, its prompts go alone, and so does every
request of the job to that server after (said once in the log). A prompt whose request is cancelled
(a hung server's requests sent elsewhere, a copy that lost) leaves the batch; the batch is cancelled
when none is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mvllm.jobs import Sample, Sampling
from mvllmd.transport import http
from mvllmd.transport.requests import RequestFailed, build_body, not_aborted, post, samples_of, send
from mvllmd.transport.streams import Prefix, Stream

log = logging.getLogger(__name__)

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
        self._alone_to: set[str] = set()  # servers that take one prompt a request (see the module's docstring)

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
        if (not self._enabled or stream or prefix or not isinstance(prompt, str) or len(prompt) > BATCH_MAX_PROMPT_CHARS
                or endpoint in self._alone_to):  # fmt: skip
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
        except _NotTaken as exc:  # the server does not take or answer batches as vLLM does
            self._go_alone(batch.endpoint, str(exc))
            await asyncio.gather(*(self._alone(batch, m) for m in members))
            return
        except RequestFailed as exc:
            if exc.retryable:
                self._fail_each(members, exc)
                return
            # One prompt too long, say: each prompt gets its own answer. None refused alone: the server
            # refused the batch itself.
            refused = await asyncio.gather(*(self._alone(batch, m) for m in members))
            if not any(refused):
                self._go_alone(batch.endpoint, str(exc))
            return
        for m, samples in zip(members, answers, strict=True):
            _settle(m, samples)

    def _fail_each(self, members: list[_Member], exc: RequestFailed) -> None:
        """A failed request fails each of its prompts, to be sent again; the server's breaker hears of it once."""
        told = False
        for m in members:
            if not m.answer.done():
                _settle(m, exc=exc if not told else RequestFailed(str(exc), retryable=True, counted=False))
                told = True

    def _go_alone(self, endpoint: str, why: str) -> None:
        if endpoint not in self._alone_to:
            self._alone_to.add(endpoint)
            log.info("server %s does not take several prompts a request (%s): one prompt a request there", endpoint,
                     why)  # fmt: skip

    async def _alone(self, batch: _Batch, m: _Member) -> bool:
        """Send one member's request alone; whether it was refused for good (a 4xx: the prompt's own)."""
        try:
            samples = await send(self._http, batch.endpoint, self._model, self._sampling, m.prompt, m.prompt_index,
                                 m.sample_indexes, batch.timeout_s, batch.api_key)  # fmt: skip
        except RequestFailed as exc:
            _settle(m, exc=exc)
            return not exc.retryable
        _settle(m, samples)
        return False

    async def _together(self, batch: _Batch, members: list[_Member]) -> list[list[Sample]]:
        fields = build_body(self._model, self._sampling, "", batch.n, None)
        fields.update(prompt=[m.prompt for m in members], return_token_ids=True)
        answer, latency = await post(self._http, batch.endpoint, "/v1/completions", fields, batch.api_key,
                                     batch.timeout_s)  # fmt: skip
        answers = self._split(answer, batch, members, latency)
        not_aborted([s for samples in answers for s in samples], batch.endpoint)
        return answers

    def _split(self, answer: Any, batch: _Batch, members: list[_Member], latency: float) -> list[list[Sample]]:
        """Each prompt's samples from a batched answer: choice k is prompt k // n's sample k % n, and
        the prompt's tokens are its choices' prompt_token_ids."""
        try:
            choices = sorted(answer["choices"], key=lambda c: c["index"])
        except (KeyError, TypeError) as exc:
            raise _NotTaken(f"its answer to a batch: {exc!r}") from exc
        if len(choices) != batch.n * len(members):
            raise _NotTaken(f"{len(choices)} choices for {len(members)} prompts of n={batch.n}")
        out = []
        for i, m in enumerate(members):
            own = choices[i * batch.n : (i + 1) * batch.n]
            if not all(_with_ids(c) for c in own):
                raise _NotTaken("no token ids in its answer")
            own_answer = {"choices": own, "usage": {"prompt_tokens": len(own[0]["prompt_token_ids"])}}
            out.append(samples_of(own_answer, batch.endpoint, self._sampling, m.prompt_index, m.sample_indexes,
                                  None, latency))  # fmt: skip
        return out


def _with_ids(choice: Any) -> bool:
    return isinstance(choice.get("prompt_token_ids"), list) and isinstance(choice.get("token_ids"), list)


class _NotTaken(Exception):
    """The server answered a batch, but not as vLLM does: its prompts go alone."""


def _settle(member: _Member, samples: list[Sample] | None = None, exc: RequestFailed | None = None) -> None:
    """The member's answer, unless it left (its request was cancelled)."""
    if member.answer.done():
        return
    if exc is not None:
        member.answer.set_exception(exc)
    else:
        member.answer.set_result(samples or [])
