"""The front door in this process, over real mvllm-sim servers on loopback, with real sockets both sides.

The daemon's fleet is stood in for by a list of READY servers (`Ready`): what is checked
here is the front door's routing, forwarding, retries and errors; the daemon-level wiring has tests
of its own.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from mvllmd.dispatch.endpoints import Endpoints, Tuning
from mvllmd.fleet import Server, Subscription
from mvllmd.frontdoor.app import FrontDoor
from mvllmd.frontdoor.servers import Servers

from simkit import StartSim


@dataclass
class Ready:
    """The fleet as the front door sees it: READY servers (model, url, api key)."""

    servers: list[tuple[str, str, str]] = field(default_factory=list)
    queues: list[asyncio.Queue[object]] = field(default_factory=list)

    def ready(self) -> list[Server]:
        return [Server(url, url, model, 256, key) for model, url, key in self.servers]

    def subscribe(self) -> Subscription:
        self.queues.append(asyncio.Queue())
        return Subscription([(self.queues[-1], self.unsubscribe)])

    def unsubscribe(self, queue: asyncio.Queue[object]) -> None:
        self.queues.remove(queue)

    def changed(self) -> None:
        for queue in self.queues:
            queue.put_nowait(object())


Door = Callable[..., Awaitable[str]]


@pytest.fixture
async def door() -> AsyncIterator[Callable[..., Awaitable[tuple[str, Ready]]]]:
    """`await door(servers, tokens=...)` -> (the front door's base URL, the READY list it follows)."""
    opened: list[tuple[FrontDoor, Servers, Endpoints]] = []

    async def _open(servers: list[tuple[str, str, str]], tokens: frozenset[str] = frozenset()) -> tuple[str, Ready]:
        ready = Ready(list(servers))
        endpoints = Endpoints(Tuning(hang_timeout_s=30, metrics_interval_s=0))
        table = Servers(endpoints, ready)  # type: ignore[arg-type]
        table.start()
        front = FrontDoor(table, tokens)
        host, port = await front.listen("127.0.0.1", 0)
        opened.append((front, table, endpoints))
        return f"http://{host}:{port}", ready

    yield _open
    for front, table, endpoints in opened:
        await front.close()
        await table.close()
        await endpoints.close()


async def post(http: aiohttp.ClientSession, url: str, body: Any, **headers: str) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers={"content-type": "application/json", **headers}) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text.startswith("{") else text)


COMPLETION = {"model": "sim", "prompt": "hello", "max_tokens": 8}


async def test_completions_and_chat_go_through_to_the_least_loaded_server(
    door: Any, start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    (a, sim_a), (b, sim_b) = await start_sim("--time-scale", "0"), await start_sim("--time-scale", "0")
    url, _ = await door([("sim", a, ""), ("sim", b, "")])
    status, answer = await post(http, f"{url}/v1/completions", {**COMPLETION, "n": 3})
    assert status == 200, answer
    assert len(answer["choices"]) == 3 and answer["usage"]["completion_tokens"] > 0
    chat = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, answer = await post(http, f"{url}/v1/chat/completions", chat)
    assert status == 200 and answer["choices"][0]["message"]["content"]
    results = await asyncio.gather(*(post(http, f"{url}/v1/completions", COMPLETION) for _ in range(40)))
    assert {s for s, _ in results} == {200}
    served = [sim_a.engine.counters.finished_requests, sim_b.engine.counters.finished_requests]
    assert min(served) > 0, served  # both servers took a share


async def test_a_stream_comes_back_as_the_server_sent_it(
    door: Any, start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    a, _ = await start_sim("--time-scale", "0")
    url, _ = await door([("sim", a, "")])
    body = {**COMPLETION, "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in (await response.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    usage = next(c["usage"] for c in chunks if c.get("usage"))
    assert text and usage["completion_tokens"] > 0


async def test_a_server_that_fails_before_answering_is_not_seen_by_the_client(
    door: Any, start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    good, _ = await start_sim("--time-scale", "0")
    bad, _ = await start_sim("--time-scale", "0", "--error-rate", "1", "--error-status", "503")
    url, _ = await door([("sim", good, ""), ("sim", bad, ""), ("sim", "http://127.0.0.1:9", "")])  # 9: refused
    results = await asyncio.gather(*(post(http, f"{url}/v1/completions", COMPLETION) for _ in range(30)))
    assert [s for s, _ in results] == [200] * 30, results[:3]


async def test_errors_in_vllms_envelope(door: Any, start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    a, _ = await start_sim("--time-scale", "0")
    url, ready = await door([("sim", a, "")])
    status, answer = await post(http, f"{url}/v1/completions", b"{not json")
    assert status == 400 and answer["error"]["code"] == 400 and "not JSON" in answer["error"]["message"]
    status, answer = await post(http, f"{url}/v1/completions", {**COMPLETION, "model": "other"})
    assert status == 404 and answer["error"]["message"] == "The model `other` does not exist. Served: sim."
    status, answer = await post(http, f"{url}/v1/completions", {**COMPLETION, "n": 0})
    assert status == 400
    for path in ("/collective_rpc", "/pause", "/sleep", "/update_weights", "/v1/nothing"):
        status, _ = await post(http, f"{url}{path}", {})
        assert status == 404, path
    async with http.post(f"{url}/v1/completions", data=io.BytesIO(b"x" * (33 * 1024 * 1024))) as response:
        assert response.status == 413
    ready.servers.clear()
    ready.changed()
    await asyncio.sleep(0.05)
    async with http.post(f"{url}/v1/completions", json=COMPLETION) as response:
        assert response.status == 503 and response.headers["retry-after"] == "5"
    async with http.get(f"{url}/health") as response:
        assert response.status == 503
    async with http.get(f"{url}/v1/models") as response:
        assert (await response.json())["data"] == []


async def test_models_and_health_follow_the_ready_servers(
    door: Any, start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    a, _ = await start_sim("--time-scale", "0")
    url, ready = await door([])
    async with http.get(f"{url}/health") as response:
        assert response.status == 503
    ready.servers.append(("sim", a, ""))
    ready.changed()
    await asyncio.sleep(0.05)
    async with http.get(f"{url}/health") as response:
        assert response.status == 200
    async with http.get(f"{url}/v1/models") as response:
        assert [m["id"] for m in (await response.json())["data"]] == ["sim"]


async def test_tokens(door: Any, start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    a, _ = await start_sim("--time-scale", "0", "--api-key", "server-key")
    url, _ = await door([("sim", a, "server-key")], frozenset({"t1", "t2"}))
    status, _ = await post(http, f"{url}/v1/completions", COMPLETION)
    assert status == 401
    status, _ = await post(http, f"{url}/v1/completions", COMPLETION, authorization="Bearer wrong")
    assert status == 401
    status, answer = await post(http, f"{url}/v1/completions", COMPLETION, authorization="Bearer t2")
    assert status == 200, answer  # and the server's own key went upstream

    open_door, _ = await door([("sim", a, "server-key")])  # no tokens: a keyed server is not handed out
    status, answer = await post(http, f"{open_door}/v1/completions", COMPLETION)
    assert status == 403 and "--http-token-file" in answer["error"]["message"]


async def test_a_session_names_itself_by_header_or_by_the_bodys_user(
    door: Any, start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    a, _ = await start_sim("--time-scale", "0")
    url, _ = await door([("sim", a, "")])
    status, _ = await post(http, f"{url}/v1/completions", COMPLETION, **{"x-session-id": "agent-1"})
    assert status == 200
    status, _ = await post(http, f"{url}/v1/completions", {**COMPLETION, "user": "agent-2"})
    assert status == 200
    status, answer = await post(http, f"{url}/v1/completions", {**COMPLETION, "user": 7})
    assert status == 400 and "`user` must be a string" in answer["error"]["message"]
