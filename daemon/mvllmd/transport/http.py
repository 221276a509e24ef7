"""The data plane's HTTP/1.1 client: keep-alive connections to each server, one request at a time on each.

A job's requests are all alike (a JSON POST to a server it already knows, a JSON answer), and at
thousands a second the client's own cost decides the throughput on a small machine: with aiohttp the
job runner spent about 180 us of CPU per sample against an instant server, with this client, over
asyncio protocols, about 85 us (README, the choices table). httptools (llhttp, the parser of uvicorn
and so of vLLM's server) reads the answers: against the parser written here before, about the same
CPU per JSON answer end to end (within a shared machine's noise; parsing alone 10 us against 13 us),
and a fifth less per streamed answer of 20 chunks (466 us against 576 us; parsing alone 34 us against
119 us; benchmarks/http_client.py, 2026-12-03). It does only what the daemon needs:

- `POST` with a body and `GET` (/metrics, /v1/models), with a few headers; answers with
  `Content-Length`, chunked, or read to the close; 204, 304 and 1xx answers have no body;
- a pool of idle keep-alive connections per server (`Pool`); a connection that was idle may have been
  closed by the server meanwhile, so a request that fails on a reused connection before any byte of
  its answer came is sent once more on a new one (the server saw no complete request, or dropped it);
- `https://` with the system's trust store, and the CAs given to `trust` (the fleet's: peers' HTTP
  listeners); no proxies, no redirects, no cookies;
- a request cancelled (a hedge lost, a deadline) closes its connection: its answer would still come;
- a streamed answer (a 200 in chunked encoding, such as vLLM's server-sent events) goes, chunk by
  chunk as each chunk is whole, to the request's `on_data`, and its Response has an empty body; a
  reader that finds the data bad (ValueError, LookupError, TypeError) makes it "a malformed stream";
- an answer's head is at most MAX_HEAD bytes, its body (or a streamed answer's chunk) at most the
  pool's `max_body` (MAX_BODY).

Everything that goes wrong on the wire raises `HttpError` (also a connection not accepted within
CONNECT_TIMEOUT_S), or `OSError` from connecting (refused, unreachable).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools

IDLE_S = 4.0  # keep-alive connections idle longer are closed: uvicorn (vLLM) closes them after 5 s
CONNECT_TIMEOUT_S = 10.0  # a server that does not accept in this time is failing, whatever it generates
MAX_HEAD = 64 * 1024
MAX_BODY = 256 * 1024 * 1024

# llhttp's reasons for what it refuses, as this client has always named them (the first that matches)
_PARSE_ERRORS = (
    ("Expected HTTP/", "not an HTTP/1.1 answer"),
    ("header", "malformed header line"),
    ("Content-Length", "bad Content-Length"),
    ("hunk size", "bad chunk size"),
)


_TRUSTED: list[str] = []  # CA files trusted beside the system's roots


def trust(cafile: str) -> None:
    """Trust the CA certificates in `cafile` too, in every pool made after (the fleet CA: server.py)."""
    ssl.create_default_context(cafile=cafile)  # fails here, not at a request, if it holds no certificate
    _TRUSTED.append(cafile)


def _tls_context() -> ssl.SSLContext:
    return _context_trusting(tuple(_TRUSTED))


@functools.lru_cache(maxsize=1)
def _context_trusting(cafiles: tuple[str, ...]) -> ssl.SSLContext:
    """One context for every https pool while the trusted CAs stay the same: making one reads the
    system's roots (about 46 ms here), and a job makes a pool for each server it reaches (a peer's
    instances are https): 512 such pools (64 hosts of 8) took 14.2 s of the event loop at each job's
    start, one context for all 0.03 s."""
    context = ssl.create_default_context()
    for cafile in cafiles:
        context.load_verify_locations(cafile=cafile)
    return context


class HttpError(Exception):
    """The connection broke, or the server's answer is not HTTP/1.1 as this client reads it."""


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time. httptools calls the on_* methods."""

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.reusable = False
        self.idle_since = 0.0
        self.received_any = False
        self._max_body = max_body
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._on_data: Callable[[bytes], None] | None = None
        self._reset()

    def _reset(self) -> None:
        self._fed = 0  # bytes fed while the head was incomplete
        self._head_size = 0  # of the header lines read
        self._reason = b""
        self._head_done = self._delimited = self._chunked = False
        self._stream_to: Callable[[bytes], None] | None = None  # a streamed answer's on_data
        self._body: list[bytes] = []  # the body so far, or a streamed answer's chunk so far
        self._size = 0

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport (uvloop's is not a subclass)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._waiter is not None and not self._waiter.done():
            if self._head_done and not self._delimited:
                self._finish(reusable=False)  # read to the close
            else:
                self._waiter.set_exception(HttpError(f"the server closed the connection{f': {exc}' if exc else ''}"))

    def request(self, data: bytes, on_data: Callable[[bytes], None] | None = None) -> asyncio.Future[Response]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._on_data = on_data
        self._reset()
        self.received_any = self.reusable = False
        if self.lost:  # closed between connecting and this request: no answer will come
            self._waiter.set_exception(HttpError("the server closed the connection"))
        else:
            self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        if self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: the connection can no longer be trusted
            return
        try:
            self._parser.feed_data(data)
            if not self._head_done:
                self._fed += len(data)
                if self._fed > MAX_HEAD:
                    raise HttpError("the answer's header is too long")
        except httptools.HttpParserCallbackError as exc:  # raised by an on_* method (or its on_data)
            self._fail(exc.__context__ if isinstance(exc.__context__, Exception) else HttpError(str(exc)))
        except httptools.HttpParserError as exc:
            self._fail(_parse_error(exc))
        except httptools.HttpParserUpgrade:
            self._fail(HttpError("an upgrade nobody asked for"))
        except HttpError as exc:
            self._fail(exc)

    # --- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None or self._waiter.done():
            raise HttpError("a second answer to one request")

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        name = name.lower()
        if name == b"content-length":
            self._delimited = True
            if value.strip().isdigit() and int(value) > self._max_body:
                raise HttpError(f"the answer is too long: Content-Length {int(value)}")
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            self._delimited = self._chunked = True

    def on_headers_complete(self) -> None:
        self._head_done = True
        if self._head_size + len(self._reason) > MAX_HEAD:
            raise HttpError("the answer's header is too long")
        if (version := self._parser.get_http_version()) not in {"1.0", "1.1"}:
            raise HttpError(f"not an HTTP/1.1 answer: HTTP/{version}")
        if self._chunked and self._parser.get_status_code() == 200:
            self._stream_to = self._on_data

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_body:
            raise HttpError("the answer is too long")
        self._body.append(body)

    def on_chunk_complete(self) -> None:
        if self._stream_to is None or not self._body:
            return
        chunk = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._size = 0
        try:
            self._stream_to(chunk)
        except (ValueError, LookupError, TypeError) as exc:  # what a stream's reader makes of bad data
            raise HttpError(f"a malformed stream: {exc!r}"[:300]) from exc

    def on_message_complete(self) -> None:
        self._finish(reusable=self._parser.should_keep_alive())

    # --- the answer ---------------------------------------------------------------------------

    def _finish(self, reusable: bool) -> None:
        assert self._waiter is not None
        body = b"" if self._stream_to is not None else b"".join(self._body)
        self.reusable = reusable and not self.lost
        self._waiter.set_result(Response(self._parser.get_status_code(), self._reason.decode("latin-1"), body))

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


def _parse_error(exc: httptools.HttpParserError) -> HttpError:
    reason = str(exc)
    name = next((name for part, name in _PARSE_ERRORS if part in reason), "a malformed answer")
    return HttpError(f"{name}: {reason[:80]}")


class Pool:
    """Keep-alive connections to one server (scheme, host and port of `base_url`)."""

    def __init__(self, base_url: str, connect_timeout_s: float = CONNECT_TIMEOUT_S, max_body: int = MAX_BODY) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self._ssl = _tls_context() if parts.scheme == "https" else None
        host_header = parts.netloc.rpartition("@")[2]  # never send userinfo
        self._host_line = f"Host: {host_header}\r\n".encode("latin-1")
        self._idle: list[_Connection] = []
        self._new = functools.partial(_Connection, max_body)
        self.connect_timeout_s = connect_timeout_s

    async def post(
        self, path: str, body: bytes, headers: dict[str, str], on_data: Callable[[bytes], None] | None = None
    ) -> Response:
        """POST `body` to `path` (after the base URL's own path); the whole answer, or with `on_data`,
        a streamed answer's chunks to it as they come (see the module docstring)."""
        return await self._send(self._head("POST", path, headers, body) + body, on_data)

    async def get(self, path: str, headers: dict[str, str]) -> Response:
        """GET `path` (after the base URL's own path); the whole answer."""
        return await self._send(self._head("GET", path, headers, None), None)

    async def _send(self, data: bytes, on_data: Callable[[bytes], None] | None) -> Response:
        while True:
            connection, reused = await self._connection()
            try:
                response = await connection.request(data, on_data)
            except HttpError:
                connection.close()
                if reused and not connection.received_any:
                    continue  # a keep-alive connection the server had closed: once more, on a new one
                raise
            except BaseException:
                connection.close()  # cancelled or timed out: its answer may still come
                raise
            if connection.reusable:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:
                connection.close()
            return response

    def _head(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode("latin-1"), self._host_line]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(b"\r\n" if body is None else f"Content-Length: {len(body)}\r\n\r\n".encode("latin-1"))
        return b"".join(lines)

    async def _connection(self) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.lost and now - connection.idle_since < IDLE_S:
                return connection, True
            connection.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):  # (no task of its own, unlike wait_for)
                _, connection = await loop.create_connection(
                    self._new, self.host, self.port, ssl=self._ssl, server_hostname=self.host if self._ssl else None
                )
        except TimeoutError as exc:
            raise HttpError(f"no connection to {self.host}:{self.port} within {self.connect_timeout_s:g} s") from exc
        return connection, False

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


class Client:
    """A pool per server base URL; close() when done."""

    def __init__(self) -> None:
        self._pools: dict[str, Pool] = {}

    def pool(self, base_url: str) -> Pool:
        pool = self._pools.get(base_url)
        if pool is None:
            pool = self._pools[base_url] = Pool(base_url)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
