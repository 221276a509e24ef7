"""The shared HTTP/1.1 server (mvllm.httpd), over real sockets: framing, keep-alive, errors and cancellation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from mvllm.httpd import Request, Response, Server, Stream, json_response

Address = tuple[str, int]


async def echo(request: Request) -> Response:
    return json_response({"method": request.method, "path": request.path, "body": request.body.decode()})


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, Address]]:
    routes = {("POST", "/echo"): echo, ("GET", "/echo"): echo}
    srv = Server(routes, max_body=1000)
    address = await srv.start("127.0.0.1", 0)
    yield srv, address
    await srv.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body: status, headers (lower-case names), body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(server: tuple[Server, Address]) -> None:
    _, (host, port) = server
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(post("/echo", b"one"))
    status, headers, body = await read_response(reader)
    assert (status, json.loads(body)["body"]) == (200, "one")
    assert "connection" not in headers  # kept open
    writer.write(post("/echo", b"two") + post("/echo", b"three"))  # pipelined, in one write
    answers = [json.loads((await read_response(reader))[2])["body"] for _ in range(2)]
    assert answers == ["two", "three"]
    writer.close()


async def test_a_chunked_body_and_expect_continue(server: tuple[Server, Address]) -> None:
    _, (host, port) = server
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"4\r\nchun\r\n3\r\nked\r\n0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert (status, json.loads(body)["body"]) == (200, "chunked")
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (post("/nowhere", b"{}"), 404),
        (b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        (post("/echo", b"x" * 1001), 413),
    ],
)
async def test_bad_requests_get_their_status_and_the_server_goes_on(
    server: tuple[Server, Address], request_bytes: bytes, status: int
) -> None:
    _, (host, port) = server
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request_bytes)
    got, headers, body = await read_response(reader)
    assert got == status
    assert body  # a JSON body says what was wrong
    if status in (400, 413):  # the byte stream is out of step: the connection is closed
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    async with aiohttp.ClientSession() as http, http.post(f"http://{host}:{port}/echo", data=b"after") as r:
        assert (r.status, (await r.json())["body"]) == (200, "after")


async def test_connection_close_is_honoured() -> None:
    srv = Server({("GET", "/echo"): echo})
    host, port = await srv.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert (status, headers["connection"]) == (200, "close")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await srv.close()


async def test_a_client_that_goes_away_cancels_its_handler() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(request: Request) -> Response:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response()

    srv = Server({("POST", "/wait"): forever})
    host, port = await srv.start("127.0.0.1", 0)
    _, writer = await asyncio.open_connection(host, port)
    writer.write(post("/wait", b"{}"))
    await asyncio.wait_for(started.wait(), 5)
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 5)
    await srv.close()


async def test_a_failing_handler_gets_500_and_the_connection_goes_on() -> None:
    calls = 0

    async def flaky(request: Request) -> Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return json_response({"ok": True})

    srv = Server({("POST", "/flaky"): flaky})
    host, port = await srv.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(post("/flaky", b"{}"))
    assert (await read_response(reader))[0] == 500
    writer.write(post("/flaky", b"{}"))
    assert (await read_response(reader))[0] == 200
    writer.close()
    await srv.close()


async def test_a_stream_that_fails_midway_is_cut_not_ended() -> None:
    async def broken(request: Request) -> Stream:
        out = await request.stream({"content-type": "text/event-stream"})
        await out.write(b"data: 0\n\n")
        raise RuntimeError("boom")

    srv = Server({("GET", "/broken"): broken})
    host, port = await srv.start("127.0.0.1", 0)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientPayloadError):  # no terminating chunk: the answer is incomplete
            async with http.get(f"http://{host}:{port}/broken") as r:
                await r.read()
    await srv.close()


async def test_a_stream_is_chunked_and_a_cut_ends_the_connection_without_an_answer() -> None:
    async def stream(request: Request) -> Stream:
        out = await request.stream({"content-type": "text/event-stream"})
        for i in range(3):
            await out.write(f"data: {i}\n\n".encode())
        return out

    async def cut(request: Request) -> Response:
        request.cut()
        return json_response({"never": "sent"})

    srv = Server({("GET", "/stream"): stream, ("GET", "/cut"): cut})
    host, port = await srv.start("127.0.0.1", 0)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{host}:{port}/stream") as r:
            assert r.headers["Transfer-Encoding"] == "chunked"
            assert await r.text() == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with http.get(f"http://{host}:{port}/cut") as r:
                await r.read()
    await srv.close()


async def test_a_stream_waits_for_a_slow_reader_and_ends_when_it_leaves() -> None:
    """Flow control: a writer whose client does not read is held (not buffered without bound), and
    stops when the client goes away."""
    written, ended = 0, asyncio.Event()

    async def flood(request: Request) -> Stream:
        nonlocal written
        out = await request.stream({"content-type": "application/octet-stream"})
        try:
            while True:
                await out.write(b"x" * 65536)
                written += 65536
        finally:
            ended.set()

    srv = Server({("GET", "/flood"): flood})
    host, port = await srv.start("127.0.0.1", 0)
    _, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(50):  # nothing is read: the writer must come to a stop
        before = written
        await asyncio.sleep(0.05)
        if written == before and written > 0:
            break
    assert 0 < written < 64 * 1024 * 1024
    assert not ended.is_set()
    writer.close()
    await asyncio.wait_for(ended.wait(), 5)
    await srv.close()
