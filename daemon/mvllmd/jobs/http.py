"""The data plane's HTTP/1.1 client: keep-alive connections to each server, one request at a time on each.

A job's requests are all alike (a JSON POST to a server it already knows, a JSON answer), and at
thousands a second the client's own cost decides the throughput on a small machine: with aiohttp the
job runner spent about 180 us of CPU per sample against an instant server, with this client, over
asyncio protocols, about 85 us (README, the choices table). It does only what the job needs:

- `POST` with a body and a few headers; answers with `Content-Length`, chunked, or read to the close;
- a pool of idle keep-alive connections per server (`Pool`); a connection that was idle may have been
  closed by the server meanwhile, so a request that fails on a reused connection before any byte of
  its answer came is sent once more on a new one (the server saw no complete request, or dropped it);
- `https://` with the system's trust store; no proxies, no redirects, no cookies;
- a request cancelled (a hedge lost, a deadline) closes its connection: its answer would still come;
- a streamed answer (a 200 in chunked encoding, such as vLLM's server-sent events) goes, chunk by
  chunk as it arrives, to the request's `on_data`, and its Response has an empty body.

Everything that goes wrong on the wire raises `HttpError` (also a connection not accepted within
CONNECT_TIMEOUT_S), or `OSError` from connecting (refused, unreachable).
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

IDLE_S = 4.0  # keep-alive connections idle longer are closed: uvicorn (vLLM) closes them after 5 s
CONNECT_TIMEOUT_S = 10.0  # a server that does not accept in this time is failing, whatever it generates
MAX_HEAD = 64 * 1024
MAX_BODY = 256 * 1024 * 1024


class HttpError(Exception):
    """The connection broke, or the server's answer is not HTTP/1.1 as this client reads it."""


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.reusable = False
        self.idle_since = 0.0
        self.received_any = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._head: tuple[int, str, dict[str, str], int] | None = None  # status, reason, headers, body start
        self._on_data: Callable[[bytes], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._waiter is not None and not self._waiter.done():
            if self._head is not None and "content-length" not in self._head[2] and not self._chunked():
                self._finish(bytes(self._buffer[self._head[3] :]), reusable=False)  # read to the close
            else:
                self._waiter.set_exception(HttpError(f"the server closed the connection{f': {exc}' if exc else ''}"))

    def request(self, data: bytes, on_data: Callable[[bytes], None] | None = None) -> asyncio.Future[Response]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._buffer.clear()
        self._head = None
        self._on_data = on_data
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
        self._buffer += data
        try:
            self._parse()
        except HttpError as exc:
            self._waiter.set_exception(exc)
            self.close()

    def _parse(self) -> None:
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    raise HttpError("the answer's header is too long")
                return
            self._head = _parse_head(bytes(self._buffer[:end]), end + 4)
        status, _, headers, start = self._head
        if self._chunked() and status == 200 and self._on_data is not None:
            self._stream(start)
        elif self._chunked():
            if not self._buffer.endswith(b"\r\n\r\n"):
                return  # a whole chunked answer ends so (the last chunk, or its trailers): not yet
            body = _dechunk(self._buffer, start)
            if body is not None:
                self._finish(body, reusable=_keep_alive(headers))
        elif "content-length" in headers:
            length = _length(headers["content-length"])
            if len(self._buffer) - start >= length:
                self._finish(bytes(self._buffer[start : start + length]), reusable=_keep_alive(headers))
        elif status in {204, 304} or 100 <= status < 200:
            self._finish(b"", reusable=_keep_alive(headers))
        elif len(self._buffer) - start > MAX_BODY:
            raise HttpError("the answer is too long")

    def _stream(self, start: int) -> None:
        """Hand each whole chunk to `on_data` and drop it from the buffer; the last one ends the answer."""
        assert self._head is not None and self._on_data is not None
        buffer, at = self._buffer, start
        while (eol := buffer.find(b"\r\n", at)) >= 0:
            size = _chunk_size(buffer, at, eol)
            if size == 0:
                if buffer.find(b"\r\n\r\n", eol) >= 0:  # the last chunk (no trailers expected)
                    self._finish(b"", reusable=_keep_alive(self._head[2]))
                break
            if eol + 2 + size + 2 > len(buffer):
                break
            try:
                self._on_data(bytes(buffer[eol + 2 : eol + 2 + size]))
            except (ValueError, LookupError, TypeError) as exc:  # what a stream's reader makes of bad data
                raise HttpError(f"a malformed stream: {exc!r}"[:300]) from exc
            at = eol + 2 + size + 2
        del buffer[:at]
        self._head = (*self._head[:3], 0)

    def _chunked(self) -> bool:
        return self._head is not None and "chunked" in self._head[2].get("transfer-encoding", "").lower()

    def _finish(self, body: bytes, reusable: bool) -> None:
        assert self._head is not None and self._waiter is not None
        status, reason, _, _ = self._head
        self.reusable = reusable and not self.lost
        self._waiter.set_result(Response(status, reason, body))

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


def _parse_head(head: bytes, body_start: int) -> tuple[int, str, dict[str, str], int]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"not an HTTP/1.1 answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise HttpError(f"malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers, body_start


def _length(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_BODY:
        raise HttpError(f"bad Content-Length {text[:40]!r}")
    return int(text)


def _keep_alive(headers: dict[str, str]) -> bool:
    return "close" not in headers.get("connection", "").lower()


def _chunk_size(buffer: bytearray, at: int, eol: int) -> int:
    size_text = bytes(buffer[at:eol]).split(b";", 1)[0].strip()
    try:
        return int(size_text, 16)
    except ValueError as exc:
        raise HttpError(f"bad chunk size {size_text[:20]!r}") from exc


def _dechunk(buffer: bytearray, start: int) -> bytes | None:
    """The body of a complete chunked answer, or None while it is incomplete."""
    body = bytearray()
    at = start
    while True:
        eol = buffer.find(b"\r\n", at)
        if eol < 0:
            return None
        size = _chunk_size(buffer, at, eol)
        if size == 0:
            return bytes(body) if buffer.find(b"\r\n\r\n", eol) >= 0 else None  # no trailers expected
        if eol + 2 + size + 2 > len(buffer):
            return None
        body += buffer[eol + 2 : eol + 2 + size]
        if len(body) > MAX_BODY:
            raise HttpError("the answer is too long")
        at = eol + 2 + size + 2


class Pool:
    """Keep-alive connections to one server (scheme, host and port of `base_url`)."""

    def __init__(self, base_url: str, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        host_header = parts.netloc.rpartition("@")[2]  # never send userinfo
        self._host_line = f"Host: {host_header}\r\n".encode("latin-1")
        self._idle: list[_Connection] = []
        self.connect_timeout_s = connect_timeout_s

    async def post(
        self, path: str, body: bytes, headers: dict[str, str], on_data: Callable[[bytes], None] | None = None
    ) -> Response:
        """POST `body` to `path` (after the base URL's own path); the whole answer, or with `on_data`,
        a streamed answer's chunks to it as they come (see the module docstring)."""
        head = self._head("POST", path, body, headers)
        while True:
            connection, reused = await self._connection()
            try:
                response = await connection.request(head + body, on_data)
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

    def _head(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode("latin-1"), self._host_line]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(f"Content-Length: {len(body)}\r\n\r\n".encode("latin-1"))
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
                    _Connection, self.host, self.port, ssl=self._ssl, server_hostname=self.host if self._ssl else None
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
