"""A small HTTP/1.1 server on asyncio and httptools, the parser uvicorn (vLLM's server) uses.

Shared: mvllm-sim serves vLLM's API on it, and the daemon's HTTP front door is to reuse it; neither
imports the other. What they need and no more: routes by method and path, request bodies
(Content-Length or chunked, `Expect: 100-continue` answered), keep-alive and pipelining (one request at
a time per connection, in order), whole responses and chunked streams (SSE) with write flow control, a
handler cancelled when its client goes away (as aiohttp's handler_cancellation and uvicorn do), and the
connection cut without an answer for fault injection. Malformed requests get 400, unknown paths 404,
other methods 405 and bodies over `max_body` 413; a handler that fails gets 500 and the server goes on.
A request must arrive whole (head and body) within `request_timeout_s` of its first byte: a client that
sends half a request and stalls gets 408 and its connection is closed (uvicorn has no such limit of its
own; nginx's client_header_timeout and client_body_timeout are 60 s). On a TLS port, a client that
speaks plain HTTP gets 400 in plain HTTP, as nginx answers it, rather than a failed handshake: the first
byte of each connection is peeked before TLS starts. Errors of its own come in vLLM's envelope
(`{"error": {"message", "type", "param", "code"}}`).

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
import socket
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
REQUEST_TIMEOUT_S = 30.0  # a request begun must arrive whole within this (a stalled client is cut: 408)
TLS_HANDSHAKE = 0x16  # the first byte of a TLS ClientHello (a TLS record of type handshake)
ERROR_TYPES = {400: "BadRequestError", 408: "RequestTimeoutError", 413: "BadRequestError"}


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
    query: str = ""  # the URL's query string, undecoded ("" without one)

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
    def __init__(self, routes: Mapping[tuple[str, str], Handler], max_body: int = MAX_BODY,
                 request_timeout_s: float = REQUEST_TIMEOUT_S,
                 prefixes: Mapping[str, Handler] | None = None) -> None:  # fmt: skip
        self.routes = dict(routes)
        self.prefixes = dict(prefixes or {})  # path prefix -> the handler of every method and path under it
        self.max_body = max_body
        self.request_timeout_s = request_timeout_s
        self._paths = {path for _, path in routes}
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._tls: _TlsListener | None = None

    async def start(
        self, host: str, port: int, backlog: int = 4096, ssl: _ssl.SSLContext | None = None
    ) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._sweeper = asyncio.create_task(self._sweep())
        if ssl is not None:
            self._tls = _TlsListener(self, ssl, host, port, backlog)
            return self._tls.address
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=backlog)
        address: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        return address

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        if self._tls is not None:
            await self._tls.close()
        for conn in list(self._connections):
            conn.cut()
        if self._server is not None:
            await self._server.wait_closed()

    async def handle(self, request: Request) -> Response:
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            handler = next((h for prefix, h in self.prefixes.items() if request.path.startswith(prefix)), None)
        if handler is None:
            status = 405 if request.path in self._paths else 404
            return json_response({"detail": HTTPStatus(status).phrase}, status)
        return await handler(request)

    async def _sweep(self) -> None:
        """Close idle keep-alive connections, and cut off requests that do not arrive in time."""
        while True:
            await asyncio.sleep(min(IDLE_TIMEOUT_S, self.request_timeout_s) / 4)
            now = time.monotonic()
            for conn in list(self._connections):
                if conn.idle_since is not None and now - conn.idle_since > IDLE_TIMEOUT_S:
                    conn.close()
                elif conn.reading_since is not None and now - conn.reading_since > self.request_timeout_s:
                    conn.timed_out(self.request_timeout_s)


class _TlsListener:
    """A TLS port that answers a plain-HTTP client in plain HTTP: each connection's first byte is peeked
    (MSG_PEEK: it stays for the handshake) before TLS starts, or not."""

    def __init__(self, server: Server, context: _ssl.SSLContext, host: str, port: int, backlog: int) -> None:
        self._server, self._context = server, context
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=backlog)
        self._sock.setblocking(False)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._starting: set[asyncio.Task[None]] = set()
        self._accepting = asyncio.create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            task = asyncio.create_task(self._open(conn))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _open(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(conn.fileno(), wake)
        try:
            async with asyncio.timeout(self._server.request_timeout_s):
                await readable
            first = conn.recv(1, socket.MSG_PEEK)
        except (TimeoutError, OSError):
            conn.close()
            return
        finally:
            loop.remove_reader(conn.fileno())
        if not first:
            conn.close()
            return
        tls = first[0] == TLS_HANDSHAKE
        try:
            await loop.connect_accepted_socket(
                lambda: _Connection(self._server, plain_at_tls=not tls), conn, ssl=self._context if tls else None
            )
        except (OSError, _ssl.SSLError, ConnectionError) as exc:  # a failed handshake: nothing to answer
            log.debug("a TLS connection failed to open: %s", exc)
            conn.close()

    async def close(self) -> None:
        self._accepting.cancel()
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(self._accepting, *self._starting, return_exceptions=True)
        self._sock.close()


class _Connection(asyncio.Protocol):
    """One client connection: httptools parses, requests queue, one task answers them in order."""

    def __init__(self, server: Server, plain_at_tls: bool = False) -> None:
        self._server = server
        self._plain_at_tls = plain_at_tls  # a plain-HTTP client at a TLS port: it gets 400 and the door
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
        self.reading_since: float | None = None  # a request has begun and not yet arrived whole

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream transport (uvloop's is not a subclass)
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._plain_at_tls:
            self._plain_at_tls = False
            self._refuse(400, "this port speaks TLS: the plain HTTP request was sent to an https:// port")
            return
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
        self.reading_since = time.monotonic()

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
        self.reading_since = None
        if self._too_large:
            self._refuse(413, f"the request body is over {self._server.max_body} bytes")
            return
        url = httptools.parse_url(self._url)
        request = Request(
            method=self._parser.get_method().decode("latin-1"),
            path=url.path.decode("latin-1"),
            headers=self._headers,
            body=b"".join(self._body),
            keep_alive=self._parser.should_keep_alive(),
            _conn=self,
            query=(url.query or b"").decode("latin-1"),
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

    def timed_out(self, timeout_s: float) -> None:
        """The request begun did not arrive whole in time: 408, and the connection closes."""
        if self._task is not None:  # an earlier request's answer is being written: judged again after it
            self.reading_since = time.monotonic()
            return
        self.reading_since = None
        self._refuse(408, f"the request did not arrive whole within {timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that cannot be parsed or taken, then close: the stream is out of step."""
        log.warning("refusing a request: %s", message)
        kind = ERROR_TYPES.get(status, HTTPStatus(status).phrase.replace(" ", "") + "Error")
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
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
