"""One front-door request, forwarded: to the least-loaded server of its model, and elsewhere if that
server fails before the client has seen a byte.

The body goes upstream untouched (only `model`, `n` and `stream` are read, by app.py). A request
that fails before its answer begins (connection refused or cut, 429 or 5xx, a server taken out as
hung while it waited) is sent to another server after a short backoff, up to MAX_ATTEMPTS in all;
the client sees only the answer that came. Once a streamed answer has begun, a server that fails
ends it with an error event and `[DONE]` (continuing it elsewhere is to come). Any other answer
(a 4xx: the server's judgement of the request) goes back as it came. A client that leaves cancels
the request upstream: its connection is closed, and vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mvllmd.dispatch.flights import Lane
from mvllmd.frontdoor.servers import Servers
from mvllmd.transport import http
from mvllmd.transport.requests import RETRYABLE_STATUS, bearer

MAX_ATTEMPTS = 4  # servers tried for one request, in all
BACKOFF_S = 0.05  # before the second attempt; doubled for each one after


@dataclass(frozen=True)
class Call:
    model: str
    path: str  # /v1/completions or /v1/chat/completions
    body: bytes
    want: int  # choices asked for (n): what the request counts in the server's load
    stream: bool
    session: str = ""  # X-Session-ID, or the body's `user`: sticky least-loaded (servers.py)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes  # empty for a streamed answer, which went to the sink


class NoServer(Exception):
    """No server of the model can take the request now."""


class Sink:
    """Where a streamed answer goes: `start` once, before the first chunk; then `write` each chunk."""

    def __init__(self, start: Callable[[], Awaitable[None]], write: Callable[[bytes], Awaitable[None]]) -> None:
        self.start, self.write = start, write
        self.started = False


class _Failed(Exception):
    """The server failed before the client saw anything: another may take the request."""


async def forward(servers: Servers, client: http.Client, call: Call, sink: Sink) -> Answer:
    """Forward `call`; raise NoServer when no server can take it (after the attempts it was given)."""
    tried: set[str] = set()
    last = ""
    for attempt in range(MAX_ATTEMPTS):
        lane = servers.pick(call.model, call.want, frozenset(tried), call.session) or servers.pick(
            call.model, call.want, session=call.session
        )
        if lane is None:
            break
        tried.add(lane.url)
        flight = servers.send(call.model, lane, call.want)
        ok: bool | None = None
        try:
            answer = await _once(client, lane, call, sink)
            ok = answer.status < 500
            return answer
        except _Failed as exc:
            ok, last = False, str(exc)
        finally:
            servers.land(call.model, flight, ok)
        await asyncio.sleep(BACKOFF_S * 2**attempt)
    raise NoServer(f"no server of {call.model} could take the request" + (f" (last: {last})" if last else ""))


async def _once(client: http.Client, lane: Lane, call: Call, sink: Sink) -> Answer:
    headers = {"Content-Type": "application/json", **(bearer(lane.endpoint.api_key) or {})}
    chunks: asyncio.Queue[bytes] = asyncio.Queue()
    on_data = chunks.put_nowait if call.stream else None
    post = asyncio.ensure_future(client.pool(lane.url).post(call.path, call.body, headers, on_data))
    try:
        while True:
            getter = asyncio.ensure_future(chunks.get())
            await asyncio.wait({post, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                await _pass_on(sink, getter.result())
                continue
            getter.cancel()
            break
        while not chunks.empty():
            await _pass_on(sink, chunks.get_nowait())
        response = post.result()  # raises what the request raised
    except (http.HttpError, OSError, TimeoutError) as exc:
        if not sink.started:
            raise _Failed(f"{lane.url}: {exc or type(exc).__name__}") from None
        await sink.write(_error_event(f"the server failed mid-answer: {exc or type(exc).__name__}"))
        return Answer(200, b"")
    finally:
        post.cancel()  # the client left, or a chunk could not be passed on: the server aborts it
    if not sink.started and response.status in RETRYABLE_STATUS:
        raise _Failed(f"{lane.url} answered {response.status}")
    return Answer(response.status, response.body)


async def _pass_on(sink: Sink, chunk: bytes) -> None:
    if not sink.started:
        sink.started = True
        await sink.start()
    await sink.write(chunk)


def _error_event(message: str) -> bytes:
    error = {"error": {"message": message, "type": "InternalServerError", "param": None, "code": 500}}
    return b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"
