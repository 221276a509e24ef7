"""One generation request to an OpenAI-compatible server (vLLM, mvllm-sim), and what came back.

`build_body` makes the request body for a prompt from the job's model and `Sampling` parameters
(mvllm.jobs): a string goes to /v1/completions, a list of {role, content} messages to
/v1/chat/completions; `n` is the number of samples asked for in this request. `send` posts it over
the job's keep-alive connections (http.py) and turns the answer into `Sample`s, or raises
`RequestFailed`, which says whether trying again (elsewhere) can help: connection errors, timeouts,
429 and 5xx can; other 4xx (a prompt too long for the context, say) cannot, and become the `error`
of those samples.

Seeds: without --seed none is sent. With it, sample s of prompt p has the seed
derive_seed(seed, p) + s, and a request for samples s..s+k-1 (always a contiguous run; see the
dispatcher) sends the seed of its first: vLLM gives choice i of a request the seed `seed + i`, so each
sample gets its own seed whatever the grouping, and a request for all of a prompt's samples sends
derive_seed(seed, p) itself. A rerun asks for the same samples (on the same model and engine), and the
seed is recorded with each one.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from mvllm.jobs import Sample, Sampling
from mvllmd.transport import http, streams
from mvllmd.transport.streams import STREAM_INTERVAL, Prefix, Stream, logprobs_of

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


ABORTED = "abort"  # vLLM's finish reason for a request it ended unfinished (a pause, a sleep, an abort call)


class RequestFailed(Exception):
    """`retryable`: trying again (elsewhere) can help. `counted`: False where the same failure was
    already told for another prompt of one request (batches.py), so the server's breaker hears of a
    failed request once."""

    def __init__(self, message: str, retryable: bool, counted: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.counted = counted


def bearer(api_key: str) -> dict[str, str] | None:
    """The Authorization header of a server that wants an API key (vLLM's --api-key), or none."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else None


def derive_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed from the job's seed and indexes: stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(":".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF


def sample_seed(sampling: Sampling, prompt_index: int, sample_index: int) -> int | None:
    """Sample `sample_index` of the prompt's seed, or None without --seed."""
    if sampling.seed is None:
        return None
    return derive_seed(sampling.seed, prompt_index) + sample_index


def build_body(
    model: str, sampling: Sampling, prompt: str | list[dict[str, str]], n: int, seed: int | None
) -> dict[str, Any]:
    body: dict[str, Any] = dict(sampling.extra_body)
    body.update(model=model, n=n, temperature=sampling.temperature, top_p=sampling.top_p)
    if isinstance(prompt, str):
        body["prompt"] = prompt
    else:
        body["messages"] = prompt
    if sampling.max_tokens is not None:
        body["max_tokens"] = sampling.max_tokens
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if seed is not None:
        body["seed"] = seed
    if sampling.logprobs is not None:
        if isinstance(prompt, str):
            body["logprobs"] = sampling.logprobs
        else:
            body.update(logprobs=True, top_logprobs=sampling.logprobs)
    if n > 1 or sampling.return_token_ids:
        # With n > 1 the token ids are the only exact count of each choice's tokens; with n = 1 the
        # usage says it, and leaving them out spares both sides the prompt's and the answer's ids.
        body["return_token_ids"] = True
    return body


def continuation_body(model: str, sampling: Sampling, prefix: Prefix) -> dict[str, Any]:
    """A /v1/completions body that continues a moved sample: the prompt's and its tokens' ids as the
    prompt, for the tokens it has left (streams.py)."""
    assert sampling.max_tokens is not None  # streams.movable
    body = build_body(model, sampling, "", 1, None)
    body.update(prompt=prefix.prompt(), max_tokens=sampling.max_tokens - len(prefix.token_ids))
    return body


async def ends_whole(client: http.Client, endpoint: str, model: str, ids: Sequence[int], api_key: str = "") -> bool:
    """Whether these generated tokens end with a whole character, by the server's /detokenize of the
    last few: a continuation may start after them. One that starts inside a character split across
    tokens (an emoji, a rare CJK character) gets a wrong text from vLLM 0.32, whose detokenizer then
    repeats the whole prompt's text. False also when the server cannot say."""
    body = json.dumps({"model": model, "tokens": list(ids[-8:])}).encode()
    try:
        async with asyncio.timeout(10.0):
            response = await client.pool(endpoint).post("/detokenize", body, _json_headers(api_key))
        text = json.loads(response.body).get("prompt") if response.status == 200 else None
    except (TimeoutError, OSError, http.HttpError, ValueError, AttributeError):
        return False
    return isinstance(text, str) and not text.endswith("\ufffd")


async def send(  # noqa: PLR0917  (the one call of the data plane; its arguments are the request)
    client: http.Client,
    endpoint: str,
    model: str,
    sampling: Sampling,
    prompt: str | list[dict[str, str]],
    prompt_index: int,
    sample_indexes: Sequence[int],
    timeout_s: float | None = None,
    api_key: str = "",
    *,
    stream: Stream | None = None,
    prefix: Prefix | None = None,
) -> list[Sample]:
    """Ask `endpoint` for these samples of one prompt in one request (n = len(sample_indexes)).

    With `stream`, the answer is streamed into it (what each choice has made shows there as it
    comes); with `prefix`, the one sample asked for continues a moved one (streams.py)."""
    n = len(sample_indexes)
    if sampling.seed is not None and list(sample_indexes) != list(range(sample_indexes[0], sample_indexes[0] + n)):
        raise ValueError(f"a seeded request asks for a contiguous run of samples, not {list(sample_indexes)}")
    seed = sample_seed(sampling, prompt_index, sample_indexes[0])
    if prefix is not None:
        path, fields = "/v1/completions", continuation_body(model, sampling, prefix)
    else:
        path = "/v1/completions" if isinstance(prompt, str) else "/v1/chat/completions"
        fields = build_body(model, sampling, prompt, n, seed)
    if stream is not None:
        fields.update(stream=True, stream_interval=STREAM_INTERVAL, return_token_ids=True,
                      stream_options={"include_usage": True})  # fmt: skip
    answer, latency = await post(client, endpoint, path, fields, api_key, timeout_s,
                                 None if stream is None else stream.feed)  # fmt: skip
    try:
        if stream is None:
            got = samples_of(answer, endpoint, sampling, prompt_index, sample_indexes, seed, latency)
        else:
            got = streams.samples(stream, endpoint, sampling, prompt_index, sample_indexes, latency, seed)
    except ValueError as exc:
        raise _failed(exc) from exc
    not_aborted(got, endpoint)
    return got if prefix is None else [prefix.join(sample) for sample in got]


async def post(  # noqa: PLR0917  (a request's parts)
    client: http.Client,
    endpoint: str,
    path: str,
    fields: dict[str, Any],
    api_key: str,
    timeout_s: float | None,
    on_data: Callable[[bytes], None] | None = None,
) -> tuple[Any, float]:
    """POST a generation request; its answer read as JSON (None when streamed to `on_data`) and the
    seconds it took. RequestFailed when none came: connection errors, timeouts, 429, 5xx and answers
    that are not JSON can be tried again; other 4xx cannot."""
    body = json.dumps(fields).encode()
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.pool(endpoint).post(path, body, _json_headers(api_key), on_data)
        if response.status != 200:
            raise RequestFailed(_error_text(response), response.status in RETRYABLE_STATUS)
        answer = None if on_data is not None else json.loads(response.body)
    except (TimeoutError, OSError, http.HttpError, ValueError) as exc:
        raise _failed(exc) from exc
    return answer, time.monotonic() - started


def not_aborted(samples: list[Sample], endpoint: str) -> None:
    """A request the server ended unfinished (paused with mode=abort, say) is tried again."""
    if any(sample.finish_reason == ABORTED for sample in samples):
        raise RequestFailed(f"{endpoint} aborted the request", retryable=True)


def _failed(exc: Exception) -> RequestFailed:
    return RequestFailed(f"{type(exc).__name__}: {exc}"[:300], retryable=True)


@functools.lru_cache(maxsize=64)
def _json_headers(api_key: str) -> dict[str, str]:
    return {"Content-Type": "application/json", **(bearer(api_key) or {})}


def _error_text(response: http.Response) -> str:
    try:
        body = json.loads(response.body)
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("error")
    except (ValueError, KeyError, TypeError, AttributeError):
        message = None
    return f"HTTP {response.status}: {message or response.reason}"[:500]


def samples_of(  # noqa: PLR0917  (every argument is a fact of the one answer)
    answer: Any,
    endpoint: str,
    sampling: Sampling,
    prompt_index: int,
    sample_indexes: Sequence[int],
    seed: int | None,
    latency: float,
) -> list[Sample]:
    """The samples of one prompt from an answer's choices (its usage counts that prompt's tokens)."""
    try:
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        usage = answer.get("usage") or {}
    except (KeyError, TypeError) as exc:
        raise RequestFailed(f"malformed answer from {endpoint}: {exc!r}", retryable=True) from exc
    if len(choices) != len(sample_indexes):
        raise RequestFailed(f"{endpoint} answered {len(choices)} choices for n={len(sample_indexes)}", True)
    prompt_tokens = usage.get("prompt_tokens")
    samples = []
    for offset, (sample_index, choice) in enumerate(zip(sample_indexes, choices, strict=True)):
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content")
        samples.append(
            Sample(
                prompt_index=prompt_index,
                sample_index=sample_index,
                response=text,
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=prompt_tokens,
                completion_tokens=_choice_tokens(choice, usage, len(choices)),
                endpoint=endpoint,
                latency_s=latency,
                seed=None if seed is None else seed + offset,  # vLLM's seed of choice i: seed + i
                error=None,
                logprobs=logprobs_of(choice.get("logprobs")),
                token_ids=choice.get("token_ids") if sampling.return_token_ids else None,
            )
        )
    return samples


def _choice_tokens(choice: dict[str, Any], usage: dict[str, Any], n: int) -> int | None:
    """Tokens of one choice: from its token ids or logprobs when given, else usage / n when n is 1."""
    if choice.get("token_ids") is not None:
        return len(choice["token_ids"])
    total = usage.get("completion_tokens")
    return total if n == 1 else None
