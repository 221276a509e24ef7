"""The data plane's HTTP/1.1 client against a real socket server that answers as each test scripts it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mvllm import httpd
from mvllmd import certs
from mvllmd.transport import http
from mvllmd.transport.http import MAX_HEAD, Client, HttpError, Pool
from mvllmd.transport.requests import ends_whole

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]  # False: close the connection


class Server:
    """A loopback server: reads each request whole, and answers with the next scripted answer."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = answers
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_client = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)  # fmt: skip
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.answers.pop(0)(reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[list[Answer]], Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(answers: list[Answer]) -> Server:
        server = Server(answers)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def json_answer(body: bytes = b'{"ok": 1}', extra: bytes = b"") -> Answer:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
                     % (len(body), extra, body))  # fmt: skip
        await writer.drain()
        return b"close" not in extra

    return answer


def in_pieces(*pieces: bytes, keep: bool = True) -> Answer:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        return keep

    return answer


def close_silently() -> Answer:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return False

    return answer


def never() -> Answer:
    """No answer: waits for the client to close the connection."""

    async def answer(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> bool:
        await reader.read()
        raise ConnectionError("closed by the client")

    return answer


async def test_keep_alive_reuses_one_connection(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    server = await serve([json_answer(), json_answer(b'{"second": 2}')])
    client = Client()
    first = await client.pool(server.url).post("/v1/completions", b'{"a": 1}', {"Authorization": "Bearer k"})
    second = await client.pool(server.url).post("/v1/completions", b"{}", {})
    client.close()
    assert (first.status, first.body, second.body) == (200, b'{"ok": 1}', b'{"second": 2}')
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in server.requests[0] and server.requests[0].endswith(b'{"a": 1}')
    assert f"Host: {server.url.removeprefix('http://')}".encode() in server.requests[0]


async def test_a_base_path_prefixes_the_request(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    server = await serve([json_answer()])
    await Pool(server.url + "/proxy/").post("/v1/completions", b"{}", {})
    assert server.requests[0].startswith(b"POST /proxy/v1/completions HTTP/1.1\r\n")


async def test_chunked_and_split_answers(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    server = await serve([
        in_pieces(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"4\r\n{\"a\"\r\n", b"5;x=1\r\n: 1}\n\r\n",
                  b"0\r\n\r\n"),
        in_pieces(b"HTTP/1.1 20", b"0 OK\r\ncontent-length: 4\r", b"\n\r\nab", b"cd"),
    ])  # fmt: skip
    pool = Pool(server.url)
    assert (await pool.post("/", b"", {})).body == b'{"a": 1}\n'
    assert (await pool.post("/", b"", {})).body == b"abcd"
    assert server.connections == 1


async def test_an_answer_read_to_the_close(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    server = await serve([in_pieces(b"HTTP/1.1 500 Oops\r\nconnection: close\r\n\r\n", b"all of it", keep=False),
                          json_answer()])  # fmt: skip
    pool = Pool(server.url)
    answer = await pool.post("/", b"", {})
    assert (answer.status, answer.reason, answer.body) == (500, "Oops", b"all of it")
    assert (await pool.post("/", b"", {})).status == 200
    assert server.connections == 2  # "connection: close" is not reused


async def test_a_stale_keep_alive_connection_is_replaced(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    """The server closes a keep-alive connection just as the next request comes (uvicorn closes idle
    ones after 5 s): that request goes once more, on a new connection, and succeeds."""
    server = await serve([json_answer(), close_silently(), json_answer(b'{"again": 1}')])
    pool = Pool(server.url)
    await pool.post("/", b"", {})
    assert (await pool.post("/", b"x", {})).body == b'{"again": 1}'
    assert server.connections == 2 and server.requests[1] == server.requests[2]


async def test_a_server_gone_after_answering_is_not_reused(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    server = await serve([in_pieces(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", keep=False), json_answer()])
    pool = Pool(server.url)
    await pool.post("/", b"", {})
    await asyncio.sleep(0.1)  # the close arrives
    assert (await pool.post("/", b"", {})).status == 200
    assert server.connections == 2 and len(server.requests) == 2  # never sent on the closed connection


async def test_a_connection_closed_on_its_first_request(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    """On a new connection, a close before the whole answer is an error, not an empty answer."""
    server = await serve([in_pieces(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", keep=False)])
    with pytest.raises(HttpError, match="closed the connection"):
        await Pool(server.url).post("/", b"", {})


async def test_garbage_is_an_error(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    server = await serve([in_pieces(b"SSH-2.0-OpenSSH\r\n\r\n"), in_pieces(b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"),
                          in_pieces(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n"),
                          in_pieces(b"HTTP/2.0 200 OK\r\ncontent-length: 0\r\n\r\n")])  # fmt: skip
    pool = Pool(server.url)
    for message in ("not an HTTP/1.1 answer", "malformed header line", "bad Content-Length", "not an HTTP/1.1 answer"):
        with pytest.raises(HttpError, match=message):
            await pool.post("/", b"", {})


async def test_a_cancelled_request_closes_its_connection(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    server = await serve([never(), json_answer()])
    pool = Pool(server.url)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await pool.post("/", b"", {})
    assert not pool._idle  # its answer may still come: the connection is not reused
    await asyncio.wait_for(server.closed_by_client.wait(), 5)
    assert (await pool.post("/", b"", {})).status == 200
    assert server.connections == 2


async def test_a_server_that_never_accepts_times_out() -> None:
    """A listener whose backlog is full drops new connections' SYNs: a black hole on loopback."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = [socket.socket() for _ in range(4)]
    for sock in queued:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
    try:
        with pytest.raises(HttpError, match=rf"no connection to 127\.0\.0\.1:{port} within 0\.3 s"):
            await Pool(f"http://127.0.0.1:{port}", connect_timeout_s=0.3).post("/", b"", {})
    finally:
        for sock in [*queued, listener]:
            sock.close()


async def test_refused_and_bad_input() -> None:
    with pytest.raises(OSError):
        await Pool("http://127.0.0.1:9").post("/", b"", {})
    with pytest.raises(ValueError, match="not an http"):
        Pool("ftp://host/")
    with pytest.raises(ValueError, match="line break"):
        await Pool("http://127.0.0.1:9").post("/", b"", {"X-Key": "a\r\nInjected: 1"})


async def test_a_streamed_answer_goes_to_on_data_chunk_by_chunk(
    serve: Callable[[list[Answer]], Awaitable[Server]],
) -> None:
    """A 200 in chunked encoding (vLLM's server-sent events) goes to on_data as each chunk comes, even
    when a chunk arrives in pieces; an error answer is read whole as ever; the connection is reused."""
    server = await serve([
        in_pieces(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\ndata: ", b"a\r\n", b"3\r\nxyz\r\n",
                  b"0\r\n", b"\r\n"),
        in_pieces(b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nlater\r\n0\r\n\r\n"),
        in_pieces(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nbad\r\n0\r\n\r\n"),
    ])  # fmt: skip
    pool = Pool(server.url)
    got: list[bytes] = []
    answer = await pool.post("/", b"", {}, got.append)
    assert (answer.status, answer.body, got) == (200, b"", [b"data: a", b"xyz"])
    got.clear()
    busy = await pool.post("/", b"", {}, got.append)
    assert (busy.status, busy.body, got) == (503, b"later", [])

    def refuse(data: bytes) -> None:
        raise ValueError(f"not an event: {data!r}")

    with pytest.raises(HttpError, match=r"a malformed stream: ValueError\(.not an event"):
        await pool.post("/", b"", {}, refuse)
    assert server.connections == 1


async def test_ends_whole_asks_detokenize(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    """A move's check (requests.ends_whole): the last tokens' text from the server's /detokenize; a
    text ending in U+FFFD (a character split across tokens) or no answer means no."""
    server = await serve([json_answer(b'{"prompt": "ab"}'), json_answer(b'{"prompt": "a\\ufffd"}'),
                          in_pieces(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
                          json_answer(b'{"nothing": 1}')])  # fmt: skip
    client = Client()
    try:
        assert await ends_whole(client, server.url, "m", list(range(20)))
        assert server.requests[0].startswith(b"POST /detokenize ") and server.requests[0].endswith(
            b'{"model": "m", "tokens": [12, 13, 14, 15, 16, 17, 18, 19]}')  # fmt: skip
        for _ in range(3):
            assert not await ends_whole(client, server.url, "m", [1, 2])
    finally:
        client.close()


async def test_get(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    """A GET has no body and no Content-Length; its answer is read as a POST's, on the same connections."""
    server = await serve([json_answer(b"vllm:num_requests_running 1\n"), json_answer()])
    pool = Pool(server.url + "/v1")
    answer = await pool.get("/models", {"Authorization": "Bearer k"})
    assert (answer.status, answer.body) == (200, b"vllm:num_requests_running 1\n")
    host = server.url.removeprefix("http://")
    assert server.requests[0] == f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer k\r\n\r\n".encode()
    assert (await pool.post("/completions", b"{}", {})).status == 200
    assert server.connections == 1


async def test_answers_without_a_body(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    """204 and 304 answers end with their head, whatever they say of a body, and keep the connection."""
    not_modified = b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n"
    server = await serve([in_pieces(b"HTTP/1.1 204 No Content\r\n\r\n"), in_pieces(not_modified), json_answer()])
    pool = Pool(server.url)
    async with asyncio.timeout(5):
        assert [(await pool.get("/", {})).status for _ in range(3)] == [204, 304, 200]
    assert server.connections == 1


@pytest.mark.parametrize("size", [b"zz", b"-1", b"0x3", b"1_0", b"fffffffffffffffffffff"])
async def test_malformed_chunk_sizes(serve: Callable[[list[Answer]], Awaitable[Server]], size: bytes) -> None:
    """A chunk size that is not hexadecimal digits (Python's int() takes "0x3", "1_0" and "-1") or does
    not fit is an error, in a whole answer and in a streamed one, after the chunks before it."""
    bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n" + size + b"\r\nxyz\r\n0\r\n\r\n"
    server = await serve([in_pieces(bad), in_pieces(bad)])
    pool = Pool(server.url)
    got: list[bytes] = []
    async with asyncio.timeout(5):
        with pytest.raises(HttpError, match="bad chunk size"):
            await pool.post("/", b"", {})
        with pytest.raises(HttpError, match="bad chunk size"):
            await pool.post("/", b"", {}, got.append)
    assert got == [b"abc"]


async def test_a_head_over_the_limit(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    """A head over MAX_HEAD is an error, whether it comes whole or as a header line that does not end
    within the limit (a client without one would wait for its end); a head just under it is read."""
    line = b"X-Big: " + b"a" * (MAX_HEAD // 2) + b"\r\n"
    whole = b"HTTP/1.1 200 OK\r\n" + line * 2 + b"content-length: 2\r\n\r\nok"
    endless = [b"HTTP/1.1 200 OK\r\nX-Big: ", *[b"a" * (MAX_HEAD // 4)] * 5]
    under = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD - 100) + b"\r\ncontent-length: 2\r\n\r\nok"
    server = await serve([in_pieces(whole), in_pieces(*endless), in_pieces(under)])
    pool = Pool(server.url)
    async with asyncio.timeout(5):
        for _ in range(2):
            with pytest.raises(HttpError, match="header is too long"):
                await pool.post("/", b"", {})
        assert (await pool.post("/", b"", {})).body == b"ok"


async def test_a_body_over_the_limit(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    """A body over the pool's max_body is an error however it is framed (a Content-Length over it at
    once, without waiting for the body); a streamed answer may be longer in all, each of its chunks may not."""
    chunked = b"".join(b"64\r\n" + b"c" * 100 + b"\r\n" for _ in range(11)) + b"0\r\n\r\n"
    streamed = b"".join(b"258\r\n" + b"s" * 600 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
    server = await serve([
        json_answer(b"x" * 1001),
        in_pieces(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n", b"the rest never comes"),
        in_pieces(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunked),
        in_pieces(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n", b"z" * 600, b"z" * 600, keep=False),
        in_pieces(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n", b"s" * 1001, b"\r\n0\r\n\r\n"),
        json_answer(b"x" * 1000),
        in_pieces(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", streamed),
    ])  # fmt: skip
    pool = Pool(server.url, max_body=1000)
    got: list[bytes] = []
    async with asyncio.timeout(5):
        for _ in range(4):
            with pytest.raises(HttpError, match="the answer is too long"):
                await pool.post("/", b"", {})
        with pytest.raises(HttpError, match="the answer is too long"):
            await pool.post("/", b"", {}, got.append)
        assert got == []
        assert (await pool.post("/", b"", {})).body == b"x" * 1000
        assert (await pool.post("/", b"", {}, got.append)).status == 200
    assert got == [b"s" * 600] * 3


async def test_a_connection_cut_mid_chunk(serve: Callable[[list[Answer]], Awaitable[Server]]) -> None:
    """A close inside a chunk, or inside a chunk's size line, is an error, not the end of the answer;
    a streamed answer's reader has had the whole chunks before the cut, and no part of the cut one."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = await serve([in_pieces(head, b"3\r\nxyz\r\n10\r\nabc", keep=False),
                          in_pieces(head, b"3\r\nxyz\r\n1", keep=False),
                          in_pieces(head, b"3\r\nxyz\r\n10\r\nabc", keep=False)])  # fmt: skip
    pool = Pool(server.url)
    got: list[bytes] = []
    async with asyncio.timeout(5):
        for on_data in (None, got.append, got.append):
            with pytest.raises(HttpError, match="closed the connection"):
                await pool.post("/", b"", {}, on_data)
    assert got == [b"xyz", b"xyz"]
    assert server.connections == 3


async def test_a_reader_that_fails_otherwise_fails_the_request(
    serve: Callable[[list[Answer]], Awaitable[Server]],
) -> None:
    """Only what a reader makes of bad data is "a malformed stream"; its own bug goes to the caller as it is."""
    server = await serve([in_pieces(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")])

    def broken(_: bytes) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        await Pool(server.url).post("/", b"", {}, broken)


async def test_https_pools_share_one_context_that_trusts_the_fleet_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a real TLS socket (mvllm.httpd with a host certificate of a fleet CA that `mvllmd certs` made):
    a pool does not trust that CA until `trust()` says so; then every https pool made after trusts it,
    through one context (making one reads the system's roots: about 46 ms)."""
    monkeypatch.setattr(http, "_TRUSTED", [])
    ca = certs.make_ca(tmp_path)
    host = certs.make_host(tmp_path, "h1", ["127.0.0.1"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(host.cert, host.key)

    async def hello(request: httpd.Request) -> httpd.Response:
        return httpd.text_response("hello")

    server = httpd.Server({("GET", "/hello"): hello}, prefixes={"/i/": hello})
    _, port = await server.start("127.0.0.1", 0, ssl=context)
    try:
        untrusted = Pool(f"https://127.0.0.1:{port}")
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusted.get("/hello", {})
        untrusted.close()
        http.trust(str(ca.cert))
        pools = [Pool(f"https://127.0.0.1:{port}/i/{name}") for name in ("a", "b")]
        assert pools[0]._ssl is pools[1]._ssl is not untrusted._ssl
        for pool in pools:
            assert (await pool.get("/hello", {})).body == b"hello"
            pool.close()
    finally:
        await server.close()
