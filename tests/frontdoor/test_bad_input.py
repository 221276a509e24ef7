"""Bad input at the front door, and its /tokenize and /detokenize: each refused in vLLM's envelope with
its status, the door serving on after it (real sockets, real mvllm-sim servers, a real TLS port)."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_app import Ready

from mvllm import httpd
from mvllm_sim.text import detokenize, token_ids
from mvllmd.dispatch.endpoints import Endpoints, Tuning
from mvllmd.frontdoor.app import FrontDoor
from mvllmd.frontdoor.servers import Servers

from simkit import StartSim

Open = Callable[..., Awaitable[tuple[str, int]]]


@pytest.fixture
async def door() -> AsyncIterator[Open]:
    """`await door(servers, ssl=..., request_timeout_s=...)` -> the front door's host and port."""
    opened: list[tuple[FrontDoor, Servers, Endpoints]] = []

    async def _open(servers: list[tuple[str, str, str]], ssl: ssl.SSLContext | None = None,
                    request_timeout_s: float = 30.0) -> tuple[str, int]:  # fmt: skip
        endpoints = Endpoints(Tuning(hang_timeout_s=30, metrics_interval_s=0))
        table = Servers(endpoints, Ready(list(servers)))  # type: ignore[arg-type]
        table.start()
        front = FrontDoor(table, request_timeout_s=request_timeout_s)
        opened.append((front, table, endpoints))
        return await front.listen("127.0.0.1", 0, ssl)

    yield _open
    for front, table, endpoints in opened:
        await front.close()
        await table.close()
        await endpoints.close()


async def exchange(host: str, port: int, data: bytes) -> tuple[int, dict[str, Any]]:
    """Send raw bytes; the status and JSON body of the answer, read to the close."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def serving(http: aiohttp.ClientSession, base: str) -> bool:
    async with http.post(f"{base}/v1/completions", json={"model": "sim", "prompt": "hi", "max_tokens": 4}) as r:
        return r.status == 200


async def test_a_client_that_sends_half_a_request_is_timed_out_and_nothing_leaks(
    door: Open, start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    a, _ = await start_sim("--time-scale", "0")
    host, port = await door([("sim", a, "")], request_timeout_s=0.5)
    half = b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model": '
    status, body = await exchange(host, port, half)  # then it stalls: the answer comes, and the close
    assert status == 408 and body["error"]["code"] == 408 and body["error"]["type"] == "RequestTimeoutError"
    status, body = await exchange(host, port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # half a head
    assert status == 408
    assert await serving(http, f"http://{host}:{port}")


async def test_a_plain_http_client_at_a_tls_port_gets_400(
    door: Open, start_sim: StartSim, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a, _ = await start_sim("--time-scale", "0")
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "k.pem", "-out", "c.pem", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1"]  # fmt: skip
    subprocess.run(argv, cwd=tmp_path, check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    host, port = await door([("sim", a, "")], ssl=context)
    status, body = await exchange(host, port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400 and "TLS" in body["error"]["message"] and body["error"]["type"] == "BadRequestError"
    client = ssl.create_default_context(cafile=tmp_path / "c.pem")
    async with http.post(f"https://{host}:{port}/v1/completions", ssl=client,
                         json={"model": "sim", "prompt": "hi", "max_tokens": 4}) as response:  # fmt: skip
        assert response.status == 200  # TLS clients are served on the same port, after it


async def test_tokenize_and_detokenize_go_to_a_server_of_the_model(
    door: Open, start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    a, _ = await start_sim("--time-scale", "0")

    async def tokenize(request: httpd.Request) -> httpd.Response:  # vLLM's /tokenize, which mvllm-sim lacks
        body = json.loads(request.body)
        tokens = token_ids(body["prompt"])
        return httpd.json_response({"count": len(tokens), "max_model_len": 4096, "tokens": tokens,
                                    "key": request.headers.get("authorization")})  # fmt: skip

    other = httpd.Server({("POST", "/tokenize"): tokenize})
    other_host, other_port = await other.start("127.0.0.1", 0)
    try:
        host, port = await door([("sim", a, ""), ("words", f"http://{other_host}:{other_port}", "")])
        base = f"http://{host}:{port}"
        async with http.post(f"{base}/tokenize", json={"model": "words", "prompt": "Hello, world!"}) as r:
            assert r.status == 200
            tokens = (await r.json())["tokens"]
        assert tokens == token_ids("Hello, world!")
        ids = token_ids("kalo mine")
        async with http.post(f"{base}/detokenize", json={"model": "sim", "tokens": ids}) as r:
            assert r.status == 200 and (await r.json())["prompt"] == detokenize(ids)
        async with http.post(f"{base}/detokenize", json={"model": "sim", "tokens": "x"}) as r:
            assert r.status == 400  # the server's own judgement of the request, as it came
        async with http.post(f"{base}/tokenize", json={"model": "nope", "prompt": "x"}) as r:
            error = (await r.json())["error"]
            assert r.status == 404 and error["message"] == "The model `nope` does not exist. Served: sim, words."
        async with http.post(f"{base}/detokenize", data=b"{nope") as r:
            assert r.status == 400 and "not JSON" in (await r.json())["error"]["message"]
        assert await serving(http, base)
    finally:
        await other.close()
