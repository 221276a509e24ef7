"""A small HTTP/1.1 server on asyncio and httptools, the parser uvicorn (vLLM's server) uses.

Shared: mvllm-sim serves vLLM's API on it, and the daemon's HTTP front door is to reuse it; neither
imports the other. What they need and no more: routes by method and path, request bodies
(Content-Length or chunked, `Expect: 100-continue` answered), keep-alive and pipelining (one request at
a time per connection, in order), whole responses and chunked streams (SSE) with write flow control, a
handler cancelled when its client goes away (as aiohttp's handler_cancellation and uvicorn do), and the
connection cut without an answer for fault injection. Malformed requests get 400, unknown paths 404,
other methods 405 and bodies over `max_body` 413; a handler that fails gets 500 and the server goes on.

It replaced aiohttp's web server in the simulator, which cost about 95 us of CPU a request there
against 40 us for this one: at --time-scale 0 that was half the simulator's cost, and the simulator
is one of the two processes the throughput benchmark has to share two cores between (README,
"Choices").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl as _ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import httptools

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024
IDLE_TIMEOUT_S = 75.0  # an idle keep-alive connection is closed after this (aiohttp's default)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)  # more headers (Retry-After, ...)


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(payload).encode())


def text_response(text: str, status: int = 200) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8")


class Stream(Response):
    """A chunked response the handler writes as it goes; returning it from the handler ends it."""

    def __init__(self, conn: _Connection) -> None:
        super().__init__()
        self._conn = conn

    async def write(self, data: bytes) -> None:
        if not data:
            return
        await self._conn.send(b"%x\r\n%s\r\n" % (len(data), data))


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    keep_alive: bool
    _conn: _Connection = field(repr=False)

    async def stream(self, headers: Mapping[str, str]) -> Stream:
        """Send a 200 with `headers` and chunked transfer encoding; the handler then writes the body."""
        self._conn.write_head(200, {**headers, "transfer-encoding": "chunked"}, self.keep_alive)
        self._conn.streaming = True
        return Stream(self._conn)

    def cut(self) -> None:
        """Drop the connection as a crashing proxy would: no answer (or no end of one), no clean close."""
        self._conn.cut()


Handler = Callable[[Request], Awaitable[Response]]


class Server:
    def __init__(self, routes: Mapping[tuple[str, str], Handler], max_body: int = MAX_BODY) -> None:
        self.routes = dict(routes)
        self.max_body = max_body
        self._paths = {path for _, path in routes}
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(
        self, host: str, port: int, backlog: int = 4096, ssl: _ssl.SSLContext | None = None
    ) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=backlog, ssl=ssl)
        self._sweeper = asyncio.create_task(self._close_idle())
        address: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        return address

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.cut()
        if self._server is not None:
            await self._server.wait_closed()

    async def handle(self, request: Request) -> Response:
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            status = 405 if request.path in self._paths else 404
            return json_response({"detail": HTTPStatus(status).phrase}, status)
        return await handler(request)

    async def _close_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_TIMEOUT_S / 4)
            now = time.monotonic()
            for conn in list(self._connections):
                if conn.idle_since is not None and now - conn.idle_since > IDLE_TIMEOUT_S:
                    conn.close()


class _Connection(asyncio.Protocol):
    """One client connection: httptools parses, requests queue, one task answers them in order."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False
        self.closed = False
        self.streaming = False  # a chunked answer's head has gone out
        self.idle_since: float | None = time.monotonic()

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream transport (uvloop's is not a subclass)
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._server._connections.discard(self)
        if self._task is not None:
            self._task.cancel()  # the client went away: its handler stops, as aiohttp's and uvicorn's do
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)  # a writer waiting for room wakes, and finds the connection closed

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # --- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size, self._too_large = b"", {}, [], 0, False
        self.idle_since = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._headers.get("expect", "").lower() == "100-continue" and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._server.max_body:
            self._too_large = True
        elif not self._too_large:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._too_large:
            self._refuse(413, f"the request body is over {self._server.max_body} bytes")
            return
        path = httptools.parse_url(self._url).path.decode("latin-1")
        request = Request(
            method=self._parser.get_method().decode("latin-1"),
            path=path,
            headers=self._headers,
            body=b"".join(self._body),
            keep_alive=self._parser.should_keep_alive(),
            _conn=self,
        )
        self._queue.append(request)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._answer())

    # --- answering ---------------------------------------------------------------------------

    async def _answer(self) -> None:
        while self._queue and not self.closed:
            request = self._queue.popleft()
            try:
                response = await self._server.handle(request)
            except asyncio.CancelledError:
                return
            except Exception:
                if self._gone():
                    return  # it failed writing to a client that had left
                log.exception("the handler of %s %s failed", request.method, request.path)
                if self.streaming:
                    self.cut()  # the head went out: the client must not take what it got for a whole answer
                    return
                response = json_response({"error": {"message": "Internal Server Error", "code": 500}}, 500)
            if self._gone():
                return  # cut by the handler, or the client left
            self.streaming = False
            if isinstance(response, Stream):
                self._transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
            else:
                headers = {"content-type": response.content_type, "content-length": str(len(response.body)),
                           **response.headers}  # fmt: skip
                self.write_head(response.status, headers, request.keep_alive, response.body)
            if not request.keep_alive:
                self.close()
                return
        self._task = None
        self.idle_since = time.monotonic()

    def _gone(self) -> bool:
        return self.closed

    def write_head(self, status: int, headers: Mapping[str, str], keep_alive: bool, body: bytes = b"") -> None:
        if self.closed:
            return
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if not keep_alive:
            lines.append("connection: close")
        self._transport.write("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)  # type: ignore[union-attr]

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        self._transport.write(data)  # type: ignore[union-attr]
        if self._drained is not None:
            await self._drained
            if self._gone():
                raise ConnectionResetError("the client closed the connection")

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that cannot be parsed or taken, then close: the stream is out of step."""
        log.warning("refusing a request: %s", message)
        body = json.dumps({"error": {"message": message, "code": status}}).encode()
        self.write_head(status, {"content-type": "application/json", "content-length": str(len(body))}, False, body)
        self.close()

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self.closed = True
            with contextlib.suppress(RuntimeError):
                self._transport.close()

    def cut(self) -> None:
        if self._transport is not None:
            self.closed = True
            self._transport.abort()
