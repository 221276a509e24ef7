"""A streamed answer as the client sees it: one stream, even when its server fails mid-way.

A streamed request that can be continued (`continuable`: the jobs' rule, streams.continuable, on one
prompt, without logprobs or echo) goes upstream with `return_token_ids`, so that what each choice has
made is known (streams.Stream); the ids are taken out of the chunks again unless the client asked for
them. When its server fails or hangs mid-way, each unfinished choice goes on elsewhere (proxy.py) as
the jobs' moves do: a /v1/completions request whose prompt is the prompt's token ids and the choice's
(streams.Prefix), for the tokens it has left. Its chunks reach the client as the original's would
have: the same id, object, created and model, the choice's own index, a delta for a chat request. The
usage the client asked for is the whole answer's: the prompt's tokens and every token each choice made.
A request that cannot be continued ends with an error event and [DONE] instead.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from mvllmd.transport.streams import Prefix, Stream, continuable

CHAT = "/v1/chat/completions"
# Fields every request may have that a continuation takes over as they are, or that it sets itself.
PLAIN_FIELDS = frozenset({"model", "prompt", "messages", "n", "stream", "stream_options", "temperature",
                          "top_p", "max_tokens", "max_completion_tokens", "user", "return_token_ids", "seed",
                          "stop"})  # fmt: skip
CARRIED = frozenset({"temperature", "top_p", "top_k", "min_p", "ignore_eos"})  # into a continuation's body
ID_FIELDS = ("token_ids", "prompt_token_ids")

Write = Callable[[bytes], Awaitable[None]]


def can_continue(fields: dict[str, Any]) -> bool:
    """Whether a streamed request's choices can go on elsewhere from their tokens (module docstring)."""
    prompt = fields.get("prompt")
    one_prompt = "messages" in fields or isinstance(prompt, str) or _ids(prompt)
    options = set(fields) - PLAIN_FIELDS
    usage = fields.get("stream_options") or {}
    return bool(
        one_prompt
        and continuable(fields.get("seed"), fields.get("stop"), options)
        and isinstance(usage, dict)
        and set(usage) <= {"include_usage"}
    )


class Events:
    """A server-sent event stream's `data:` payloads, whole, as its bytes come."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[bytes]:
        events = (self._rest + data).split(b"\n\n")
        self._rest = events.pop()
        return [line[5:].strip() for event in events for line in event.split(b"\n") if line.startswith(b"data:")]


class Relay:
    """One streamed request's answer to the client: its original's chunks, and its continuations'."""

    def __init__(self, path: str, fields: dict[str, Any], write: Write) -> None:
        self.continuable = can_continue(fields)
        self._fields, self._write, self._chat = fields, write, path == CHAT
        self._ids_asked = fields.get("return_token_ids") is True
        options = fields.get("stream_options")
        self._usage_asked = isinstance(options, dict) and options.get("include_usage") is True
        self.stream = Stream(fields.get("n", 1))  # what each choice has made, across its continuations
        self._events = Events()
        self._head: dict[str, Any] = {}  # the first chunk's id, object, created and model
        self.done = False  # the original's [DONE] went out
        self.continued = False

    def body(self, raw: bytes) -> bytes:
        """The original request's body upstream: as the client sent it, with token ids asked for if it
        can be continued."""
        if not self.continuable or self._ids_asked:
            return raw
        return json.dumps({**self._fields, "return_token_ids": True}).encode()

    async def original(self, data: bytes) -> None:
        """Pass a chunk of the original answer on (ValueError: a malformed stream)."""
        if not self.continuable:
            await self._write(data)
            return
        out = []
        for payload in self._events.feed(data):
            if payload == b"[DONE]":
                self.done = True
                out.append(payload)
                continue
            chunk = json.loads(payload)
            self.stream.add(chunk)
            if not self._head:
                self._head = {key: chunk.get(key) for key in ("id", "object", "created", "model")}
            out.append(payload if self._ids_asked else json.dumps(_without_ids(chunk)).encode())
        if out:
            await self._write(b"".join(b"data: " + payload + b"\n\n" for payload in out))

    # --- continuations ---------------------------------------------------------------------------------

    def unfinished(self) -> list[int]:
        return self.stream.unfinished()

    def prefix(self, i: int, started: float) -> Prefix | None:
        """What choice `i` has made (a Prefix of no tokens if none yet); None without the prompt's ids."""
        ids = self.stream.prompt_token_ids
        if ids is None:
            return None
        made = self.stream.prefix(i, started, None)
        return made or Prefix(tuple(ids), (), "", (), len(ids), started)

    def left(self, prefix: Prefix) -> int | None:
        """Tokens the choice may still make (None: up to the context)."""
        limit = self._fields.get("max_completion_tokens", self._fields.get("max_tokens"))
        return None if not isinstance(limit, int) else limit - len(prefix.token_ids)

    def continuation(self, model: str, prefix: Prefix) -> bytes:
        """The /v1/completions body that continues a choice from `prefix`."""
        body = {key: value for key, value in self._fields.items() if key in CARRIED}
        body.update(model=model, prompt=prefix.prompt(), n=1, stream=True, return_token_ids=True)
        left = self.left(prefix)
        if left is not None:
            body["max_tokens"] = left
        return json.dumps(body).encode()

    def piece(self, i: int) -> Callable[[bytes], Awaitable[None]]:
        """Where a continuation of choice `i` writes: its chunks, as the original's choice `i`."""
        self.continued = True
        events = Events()

        async def feed(data: bytes) -> None:
            out = []
            for payload in events.feed(data):
                if payload == b"[DONE]":
                    continue
                chunk = json.loads(payload)
                for choice in chunk.get("choices") or ():
                    out.append(self._as_original(i, choice))
            if out:
                await self._write(b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in out))

        return feed

    async def ended(self, i: int, reason: str) -> None:
        """Choice `i` ended without a continuation (its tokens were all made)."""
        await self._write(b"data: " + json.dumps(self._as_original(i, {"text": "", "finish_reason": reason})).encode()
                          + b"\n\n")  # fmt: skip

    async def finish(self) -> None:
        """After the continuations: the whole answer's usage if asked for, and [DONE]."""
        if self._usage_asked:
            prompt = len(self.stream.prompt_token_ids or ())
            made = sum(len(c.token_ids) for c in self.stream.choices)
            usage = {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}
            await self._write(b"data: " + json.dumps({**self._head, "choices": [], "usage": usage}).encode() + b"\n\n")
        await self._write(b"data: [DONE]\n\n")

    async def fail(self, message: str) -> None:
        """End the stream with an error event and [DONE] (vLLM's envelope)."""
        error = {"error": {"message": message, "type": "InternalServerError", "param": None, "code": 500}}
        await self._write(b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n")

    def _as_original(self, i: int, choice: dict[str, Any]) -> dict[str, Any]:
        """A continuation's choice (completions) as the original's choice `i`, counted in its tokens."""
        self.stream.add({"choices": [{**choice, "index": i}]})
        text, reason = choice.get("text") or "", choice.get("finish_reason")
        if self._chat:
            out: dict[str, Any] = {"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": reason}
        else:
            out = {"index": i, "text": text, "logprobs": None, "finish_reason": reason,
                   "stop_reason": choice.get("stop_reason")}  # fmt: skip
        if self._ids_asked:
            out["token_ids"] = choice.get("token_ids")
        return {**self._head, "choices": [out]}


def _ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def _without_ids(chunk: dict[str, Any]) -> dict[str, Any]:
    for field in ID_FIELDS:
        chunk.pop(field, None)
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict):
            for field in ID_FIELDS:
                choice.pop(field, None)
    return chunk
