"""One front-door request, forwarded: to the least-loaded server of its model, elsewhere if that server
fails before the client has seen a byte, and a streamed answer continued elsewhere if it fails after.

The body goes upstream untouched (only `model`, `n` and `stream` are read, by app.py; a stream that can
be continued also asks for token ids, relay.py). A request that fails before its answer begins
(connection refused or cut, 429 or 5xx, its server taken out as hung or gone while it waited) is sent
to another server after a short backoff, up to MAX_ATTEMPTS servers in all; the client sees only the
answer that came. A streamed answer whose server fails or is taken out mid-way goes on elsewhere from
the tokens each choice made, where it can (relay.py: unseeded, no stop strings, as the jobs' moves),
so that the client sees one stream; else it ends with an error event and `[DONE]`. Any other answer
(a 4xx: the server's judgement of the request) goes back as it came. A client that leaves cancels
the request upstream: its connection is closed, and vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mvllmd.dispatch.flights import Lane
from mvllmd.frontdoor.relay import Relay
from mvllmd.frontdoor.servers import Servers
from mvllmd.metrics import NO_EVENTS, Events
from mvllmd.transport import http
from mvllmd.transport.requests import RETRYABLE_STATUS, bearer, ends_whole

MAX_ATTEMPTS = 4  # servers tried for one request (or one continuation), in all
BACKOFF_S = 0.05  # before the second attempt; doubled for each one after
COMPLETIONS = "/v1/completions"
VERSION_HEADER = "x-mvllm-weight-version"  # a request's pins it to servers at that version; an answer's says it


@dataclass(frozen=True)
class Call:
    model: str
    path: str  # the route: /v1/completions, /v1/chat/completions, /tokenize, /detokenize
    body: bytes
    want: int  # choices asked for (n): what the request counts in the server's load
    stream: bool
    session: str = ""  # X-Session-ID, or the body's `user`: sticky least-loaded (servers.py)
    fields: dict[str, Any] = field(default_factory=dict)  # the body, parsed
    weight_version: str = ""  # X-Mvllm-Weight-Version: only servers at that version


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes  # empty for a streamed answer, which went to the sink
    headers: dict[str, str] = field(default_factory=dict)  # X-Mvllm-Weight-Version, from a server that has one


class NoServer(Exception):
    """No server of the model can take the request now."""


class Sink:
    """Where a streamed answer goes: `start` once, with the answer's own headers, before the first chunk;
    then `write` each chunk."""

    def __init__(
        self, start: Callable[[dict[str, str]], Awaitable[None]], write: Callable[[bytes], Awaitable[None]]
    ) -> None:
        self.start, self.write = start, write
        self.started = False


class _Failed(Exception):
    """The server failed, or was taken out, before or during the answer."""


class _Cut(Exception):
    """A streamed answer failed once begun."""


class ClientGone(Exception):
    """The client could not be written to: it left (its handler is being cancelled)."""


@dataclass
class _Upstream:
    """One request upstream and where its streamed chunks go (None: a whole answer)."""

    path: str
    body: bytes
    want: int
    on_data: Callable[[bytes], Awaitable[None]] | None
    begun: bool = False  # a chunk of its answer was passed on


class _Forward:
    """One client request: the servers it tried, its timings, what it tells the metrics."""

    def __init__(self, servers: Servers, client: http.Client, call: Call, events: Events) -> None:
        self.servers, self.client, self.call, self.events = servers, client, call, events
        self.tried: set[str] = set()  # servers that failed it
        self.started = time.monotonic()
        self.first_byte: float | None = None
        self.server = ""  # the last that answered
        self.version = ""  # the version of the weights of the server tried last

    async def send(self, up: _Upstream) -> http.Response:
        """Send to a server of the model, and to another while it fails before its answer begins; raise
        _Cut once it fails after, NoServer when no server can take it."""
        call, last = self.call, ""
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                self.events.door_retry(call.model)
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
            avoid = frozenset(self.tried)
            lane = self.servers.pick(call.model, up.want, avoid, call.session, call.weight_version)
            lane = lane or self.servers.pick(call.model, up.want, session=call.session, version=call.weight_version)
            if lane is None:
                break
            try:
                return await self._once(lane, up)
            except _Failed as exc:
                self.tried.add(lane.url)
                last = str(exc)
                if up.begun:
                    raise _Cut(last) from None
        at = f" at weight version {call.weight_version}" if call.weight_version else ""
        raise NoServer(f"no server of {call.model}{at} could take the request" + (f" (last: {last})" if last else ""))

    def headers(self) -> dict[str, str]:
        """The answer's own headers: the version of the weights of the server that answered."""
        return {VERSION_HEADER: self.version} if self.version else {}

    async def _once(self, lane: Lane, up: _Upstream) -> http.Response:
        self.version = lane.endpoint.weights.version
        flight = self.servers.send(self.call.model, lane, up.want)
        out = self.servers.watch(flight)
        ok: bool | None = None
        try:
            response = await _exchange(self.client, lane, up, out, self._first)
            if not up.begun and response.status in RETRYABLE_STATUS:
                ok = False
                raise _Failed(f"{lane.url} answered {response.status}")
            ok = response.status < 500 if up.want else None  # /tokenize: no sample to time the server by
            self.server = lane.url
            return response
        except _Failed:
            ok = False if not out.done() else None  # taken out: the table has judged it already
            raise
        finally:
            self.servers.land(self.call.model, flight, ok)

    def _first(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.monotonic() - self.started

    def ended(self, status: int) -> None:
        took = time.monotonic() - self.started
        self.events.door_request(self.call.model, self.server, status, self.first_byte, took)


async def forward(servers: Servers, client: http.Client, call: Call, sink: Sink, events: Events = NO_EVENTS) -> Answer:
    """Forward `call`; raise NoServer when no server can take it (after the attempts it was given)."""
    door = _Forward(servers, client, call, events)
    status = 499  # the client left (nginx's code), unless an answer is known
    try:
        if call.stream:
            answer = await _streamed(door, Relay(call.path, call.fields, sink.write), sink)
        else:
            response = await door.send(_Upstream(call.path, call.body, call.want, None))
            answer = Answer(response.status, response.body, door.headers())
        status = answer.status
        return answer
    except NoServer:
        status = 503
        raise
    finally:
        door.ended(status)


async def _streamed(door: _Forward, relay: Relay, sink: Sink) -> Answer:
    async def on_data(chunk: bytes) -> None:
        if not sink.started:
            sink.started = True
            await sink.start(door.headers())
        await relay.original(chunk)

    original = _Upstream(door.call.path, relay.body(door.call.body), door.call.want, on_data)
    try:
        response = await door.send(original)
    except _Cut as cut:
        if relay.done:
            return Answer(200, b"")  # all of it came but the connection's end
        if not relay.continuable or not await _continue(door, relay):
            door.events.door_stream_failed(door.call.model)
            await relay.fail(f"the server failed mid-answer: {cut}")
            return Answer(200, b"")
        await relay.finish()
        return Answer(200, b"")
    return Answer(response.status, response.body)


async def _continue(door: _Forward, relay: Relay) -> bool:
    """Each unfinished choice on another server, from what it made; False if one cannot go on."""
    results = await asyncio.gather(*(_continue_choice(door, relay, i) for i in relay.unfinished()))
    return all(results)


async def _continue_choice(door: _Forward, relay: Relay, i: int) -> bool:
    model = door.call.model
    for _ in range(MAX_ATTEMPTS):
        prefix = relay.prefix(i, door.started)
        if prefix is None:
            return False
        left = relay.left(prefix)
        if left is not None and left <= 0:
            await relay.ended(i, "length")  # its last chunk was lost with its server
            return True
        if prefix.token_ids and not await _ends_whole(door, prefix.token_ids):
            return False  # a continuation would start inside a character (requests.ends_whole)
        door.events.door_continued(model)
        up = _Upstream(COMPLETIONS, relay.continuation(model, prefix), 1, relay.piece(i))
        try:
            response = await door.send(up)
        except _Cut:
            continue  # cut again: on from what it made by now
        except NoServer:
            return False
        return response.status == 200 and i not in relay.unfinished()
    return False


async def _ends_whole(door: _Forward, ids: tuple[int, ...]) -> bool:
    lane = door.servers.pick(door.call.model, 1, frozenset(door.tried))
    return lane is not None and await ends_whole(door.client, lane.url, door.call.model, ids, lane.endpoint.api_key)


async def _exchange(
    client: http.Client, lane: Lane, up: _Upstream, out: asyncio.Future[None], first: Callable[[], None]
) -> http.Response:
    """One request to `lane`'s server; raise _Failed if the connection fails or the server is taken out
    (`out`) before the answer ends. A streamed answer's chunks go to `up.on_data` as they come."""
    headers = {"Content-Type": "application/json", **(bearer(lane.endpoint.api_key) or {})}
    if up.on_data is None:
        return await _whole(client, lane, up, out, headers=headers, first=first)
    chunks: asyncio.Queue[bytes] = asyncio.Queue()
    on_data = chunks.put_nowait if up.on_data is not None else None
    post = asyncio.ensure_future(client.pool(lane.url).post(up.path, up.body, headers, on_data))
    try:
        while True:
            getter = asyncio.ensure_future(chunks.get())
            waits: set[asyncio.Future[Any]] = {post, getter, out}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                await _pass_on(up, getter.result(), first)
                continue
            getter.cancel()
            if out.done():
                raise _Failed(f"{lane.url} was taken out (hung or gone)")
            break
        while not chunks.empty():
            await _pass_on(up, chunks.get_nowait(), first)
        response = post.result()  # raises what the request raised
    except (http.HttpError, OSError, TimeoutError, ValueError) as exc:
        raise _Failed(f"{lane.url}: {exc or type(exc).__name__}") from None
    finally:
        post.cancel()  # the client left, or a chunk could not be passed on: the server aborts it
    if up.on_data is None or response.body:
        first()
    return response


async def _whole(
    client: http.Client,
    lane: Lane,
    up: _Upstream,
    out: asyncio.Future[None],
    *,
    headers: dict[str, str],
    first: Callable[[], None],
) -> http.Response:
    """A whole (not streamed) answer: awaited as it is, the server's being taken out cancelling it (no
    queue, no second task to wait on: the front door's most common request costs least)."""
    post = asyncio.ensure_future(client.pool(lane.url).post(up.path, up.body, headers, None))
    out.add_done_callback(lambda _: post.cancel())  # taken out: abandoned (told from the client leaving below)
    try:
        response = await post
    except asyncio.CancelledError:
        if out.done() and not _cancelling():
            raise _Failed(f"{lane.url} was taken out (hung or gone)") from None
        raise
    except (http.HttpError, OSError, TimeoutError, ValueError) as exc:
        raise _Failed(f"{lane.url}: {exc or type(exc).__name__}") from None
    finally:
        post.cancel()  # the client left: the server aborts it
    first()
    return response


def _cancelling() -> bool:
    """This task is being cancelled (the client left), not just the request it awaited."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _pass_on(up: _Upstream, chunk: bytes, first: Callable[[], None]) -> None:
    assert up.on_data is not None
    first()
    up.begun = True
    try:
        await up.on_data(chunk)
    except OSError as exc:  # the client's side, not the server's: nothing to retry or continue
        raise ClientGone(str(exc)) from exc
