"""Streamed requests, and samples moved while they run.

A request can be streamed (vLLM's server-sent events, a chunk per STREAM_INTERVAL tokens of each
choice, with their token ids): `Stream` reads the chunks as they come and so knows what each choice
has made so far. The dispatcher uses that to move a sample off a slow server near the end of a job
(dispatch.py): it cancels the request (vLLM aborts it) and continues each unfinished choice
elsewhere from a `Prefix`, the tokens it had made. The continuation is a /v1/completions request
whose prompt is the prompt's token ids and those tokens', for the tokens that are left: the model
goes on from where the sample was, so the whole is one sample, with the distribution of a sample made
in one request (no first-answer-wins race, which would favour short samples). `Prefix.join` makes the
one Sample of the two parts.

Only what a continuation reproduces exactly can move (see `continuable`): no seed (a seeded sample
must be the same on a rerun, whatever moved), no stop strings (one could straddle the cut), and no
request option (penalties, structured output) that would read the prefix as prompt; a job's sample
also needs a max_tokens to split (`movable`). The front door continues a client's stream cut mid-way
by the same rule (frontdoor/relay.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mvllm.jobs import Sample, Sampling

STREAM_INTERVAL = 64  # tokens per chunk of a streamed choice (vLLM's per-request stream_interval)
MOVABLE_EXTRA = frozenset({"top_k", "min_p", "ignore_eos", "chat_template_kwargs"})


def continuable(seed: object, stop: object, options: Iterable[str]) -> bool:
    """Whether a sample asked for with this seed, these stop strings and these request options (beyond
    the prompt, n, temperature, top_p, max_tokens) continues exactly from its tokens (module docstring)."""
    return seed is None and not stop and set(options) <= MOVABLE_EXTRA


def movable(sampling: Sampling) -> bool:
    """Whether a sample of this job can be continued elsewhere as the same sample (module docstring)."""
    return (
        continuable(sampling.seed, sampling.stop, sampling.extra_body)
        and sampling.max_tokens is not None
        and sampling.max_tokens >= 2 * STREAM_INTERVAL
    )


def logprobs_of(block: Any) -> list[float] | None:
    """The sampled tokens' logprobs from a completions or a chat logprobs block."""
    if not isinstance(block, dict):
        return None
    if "token_logprobs" in block:
        return [float(v) for v in block["token_logprobs"] if v is not None]
    if "content" in block and isinstance(block["content"], list):
        return [float(t["logprob"]) for t in block["content"]]
    return None


@dataclass
class Partial:
    """One streamed choice so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    versions: list[str] = field(default_factory=list)  # the weights' versions its tokens came from, in order


class Stream:
    """A streamed answer as it comes (`feed` gets the body's bytes): each choice's text, token ids,
    logprobs and finish reason, the prompt's token ids, and the usage.

    With `version`, the version of the server's weights now (weights/): each chunk's tokens are
    counted as that version's when they are read. An update resumes the server only after its
    pause, reload and version calls have gone and come back, and a pause answers once the tokens
    made before it are on their way: those are read before the server makes another."""

    def __init__(
        self, n: int, on_finish: Callable[[], None] = lambda: None, version: Callable[[], str] | None = None
    ) -> None:
        self.choices = [Partial() for _ in range(n)]
        self._on_finish = on_finish  # called as each choice finishes
        self._version = version
        self.prompt_token_ids: list[int] | None = None
        self.usage: dict[str, Any] = {}
        self.done = False  # [DONE] came
        self._rest = b""

    def feed(self, data: bytes) -> None:
        """Raises ValueError on a malformed event."""
        events = (self._rest + data).split(b"\n\n")
        self._rest = events.pop()
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue  # comments, event names, keep-alives
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.done = True
                else:
                    self._chunk(json.loads(payload))

    def add(self, chunk: Any) -> None:
        """One event's data, already parsed (for a reader that splits the events itself); ValueError if
        it is not a chunk."""
        self._chunk(chunk)

    def _chunk(self, chunk: Any) -> None:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices", []), list):
            raise ValueError("a chunk that is not an object with a list of choices")
        if isinstance(chunk.get("prompt_token_ids"), list):  # chat: on the first chunk
            self.prompt_token_ids = chunk["prompt_token_ids"]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            try:
                partial = self.choices[choice["index"]]
            except (KeyError, IndexError, TypeError) as exc:
                raise ValueError(f"a chunk for no choice asked for: {exc!r}") from exc
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or {}).get("content")
            partial.text.append(text or "")
            if self._version is not None and (text or choice.get("token_ids")):
                version = self._version()
                if not partial.versions or partial.versions[-1] != version:
                    partial.versions.append(version)
            if isinstance(choice.get("prompt_token_ids"), list) and self.prompt_token_ids is None:
                self.prompt_token_ids = choice["prompt_token_ids"]  # completions: on a choice's first chunk
            partial.token_ids.extend(choice.get("token_ids") or ())
            partial.logprobs.extend(logprobs_of(choice.get("logprobs")) or ())
            if choice.get("finish_reason") and partial.finish_reason is None:
                partial.finish_reason = choice["finish_reason"]
                self._on_finish()

    @property
    def started(self) -> bool:
        return self.prompt_token_ids is not None and any(c.token_ids for c in self.choices)

    def unfinished(self) -> list[int]:
        return [i for i, c in enumerate(self.choices) if c.finish_reason is None]

    def sample(  # noqa: PLR0917  (as requests._samples: each is a fact of the answer)
        self,
        i: int,
        endpoint: str,
        sampling: Sampling,
        prompt_index: int,
        sample_index: int,
        latency: float,
        seed: int | None = None,
    ) -> Sample:
        """Choice `i` as a Sample (`seed`: the request's); it must have finished."""
        c = self.choices[i]
        prompt_tokens = self.usage.get("prompt_tokens")
        if prompt_tokens is None and self.prompt_token_ids is not None:
            prompt_tokens = len(self.prompt_token_ids)
        return Sample(
            prompt_index=prompt_index,
            sample_index=sample_index,
            response="".join(c.text),
            finish_reason=c.finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(c.token_ids),
            endpoint=endpoint,
            latency_s=latency,
            seed=None if seed is None else seed + i,  # vLLM's seed of choice i: seed + i
            error=None,
            logprobs=list(c.logprobs) if sampling.logprobs is not None else None,
            token_ids=list(c.token_ids) if sampling.return_token_ids else None,
            weight_versions=list(c.versions) or None,
        )

    def prefix(self, i: int, started: float, earlier: Prefix | None) -> Prefix | None:
        """What choice `i` has made, to continue elsewhere (after `earlier`, when this request was
        itself a continuation); None when it has made nothing yet."""
        c = self.choices[i]
        if not c.token_ids or self.prompt_token_ids is None:
            return None
        made = Prefix(tuple(self.prompt_token_ids), tuple(c.token_ids), "".join(c.text), tuple(c.logprobs),
                      len(self.prompt_token_ids), started, tuple(c.versions))  # fmt: skip
        if earlier is None:
            return made
        return Prefix(earlier.prompt_token_ids, earlier.token_ids + made.token_ids, earlier.text + made.text,
                      earlier.logprobs + made.logprobs, earlier.prompt_tokens, earlier.started,
                      spanned(earlier.versions, made.versions))  # fmt: skip


@dataclass(frozen=True)
class Prefix:
    """The tokens a sample made before it moved; the next request continues from them."""

    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    prompt_tokens: int
    started: float  # when the sample was first sent
    versions: tuple[str, ...] = ()  # the weights' versions of its tokens, in order

    def prompt(self) -> list[int]:
        return [*self.prompt_token_ids, *self.token_ids]

    def join(self, rest: Sample) -> Sample:
        """The one sample of this prefix and the continuation's answer `rest`."""
        made = len(self.token_ids)
        return Sample(
            prompt_index=rest.prompt_index,
            sample_index=rest.sample_index,
            response=self.text + (rest.response or ""),
            finish_reason=rest.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=None if rest.completion_tokens is None else made + rest.completion_tokens,
            endpoint=rest.endpoint,
            latency_s=time.monotonic() - self.started,
            seed=None,
            error=None,
            logprobs=None if rest.logprobs is None else [*self.logprobs, *rest.logprobs],
            token_ids=None if rest.token_ids is None else [*self.token_ids, *rest.token_ids],
            weight_versions=list(spanned(self.versions, rest.weight_versions or ())) or None,
        )


def spanned(first: Sequence[str], then: Sequence[str]) -> tuple[str, ...]:
    """The versions of two runs of tokens, one after the other: a version the second starts with is
    not listed twice."""
    if first and then and first[-1] == then[0]:
        return (*first, *then[1:])
    return (*first, *then)


def samples(  # noqa: PLR0917  (as Stream.sample)
    stream: Stream,
    endpoint: str,
    sampling: Sampling,
    prompt_index: int,
    indexes: Sequence[int],
    latency: float,
    seed: int | None,
) -> list[Sample]:
    """A whole streamed answer's Samples; ValueError if a choice never finished."""
    if stream.unfinished():
        raise ValueError(f"the stream ended with choices {stream.unfinished()} unfinished")
    return [stream.sample(i, endpoint, sampling, prompt_index, s, latency, seed) for i, s in enumerate(indexes)]
