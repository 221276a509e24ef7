"""Streams cut mid-way that go on on another server, and a client that leaves: the front door in this
process over real mvllm-sim servers (the fleet stood in for by test_app.Ready, as there)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from test_app import Ready

from mvllm_sim.text import token_ids
from mvllmd.dispatch.endpoints import Endpoints, Tuning
from mvllmd.dispatch.flights import Flight
from mvllmd.frontdoor.app import FrontDoor
from mvllmd.frontdoor.servers import Servers

from simkit import StartSim

Open = Callable[..., Awaitable[tuple[str, Servers, FrontDoor]]]


@pytest.fixture
async def door() -> AsyncIterator[Open]:
    """`await door(servers, hang_timeout_s=...)` -> (base URL, the server table, the front door)."""
    opened: list[tuple[FrontDoor, Servers, Endpoints]] = []

    async def _open(servers: list[tuple[str, str, str]], hang_timeout_s: float = 30) -> tuple[str, Servers, FrontDoor]:
        endpoints = Endpoints(Tuning(hang_timeout_s=hang_timeout_s, metrics_interval_s=0))
        table = Servers(endpoints, Ready(list(servers)))  # type: ignore[arg-type]
        table.start()
        front = FrontDoor(table)
        host, port = await front.listen("127.0.0.1", 0)
        opened.append((front, table, endpoints))
        return f"http://{host}:{port}", table, front

    yield _open
    for front, table, endpoints in opened:
        await front.close()
        await table.close()
        await endpoints.close()


def busy(table: Servers, url: str, requests: int) -> list[Flight]:
    """Put load on `url` as front-door requests do, so that the next request goes to the other server."""
    lane = table.pick("sim", 1, avoid=frozenset(u for u in table._models["sim"].lanes if u != url))
    assert lane is not None and lane.url == url
    return [table.send("sim", lane, 1) for _ in range(requests)]


async def events(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    """The streamed answer's events: parsed chunks, and "[DONE]"."""
    async with http.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        text = await response.text()
    payloads = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def choices(chunks: list[Any]) -> dict[int, dict[str, Any]]:
    """Per choice index: its text, token ids and finish reasons, as the client put them together."""
    found: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for c in chunk.get("choices", []):
            mine = found.setdefault(c["index"], {"text": "", "ids": [], "reasons": []})
            mine["text"] += c["text"] if "text" in c else c["delta"].get("content") or ""
            mine["ids"] += c.get("token_ids") or []
            if c.get("finish_reason"):
                mine["reasons"].append(c["finish_reason"])
    return found


STREAM = {"model": "sim", "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "stream": True,
          "stream_options": {"include_usage": True}}  # fmt: skip


async def test_a_stream_cut_mid_way_goes_on_on_another_server_as_one_stream(
    door: Open, start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    cutting, sim_cut = await start_sim("--time-scale", "0", "--drop-rate", "1")  # every answer cut after a chunk
    good, sim_good = await start_sim("--time-scale", "0")
    url, table, front = await door([("sim", cutting, ""), ("sim", good, "")])
    busy(table, good, 3)  # the request goes to the server that cuts
    got = await events(http, f"{url}/v1/completions", {**STREAM, "n": 2, "return_token_ids": True})
    assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
    chunks = got[:-1]
    assert not [c for c in chunks if "error" in c], chunks
    assert len({c["id"] for c in chunks}) == 1 and {c["object"] for c in chunks} == {"text_completion"}
    per_choice = choices(chunks)
    assert sorted(per_choice) == [0, 1]
    for mine in per_choice.values():
        assert mine["reasons"] == ["length"]
        assert len(mine["ids"]) == 40  # max_tokens, across both servers
        assert token_ids(mine["text"]) == mine["ids"]  # the text of those tokens, nothing lost or doubled
    usage = chunks[-1]["usage"]
    assert usage == {"prompt_tokens": 4, "completion_tokens": 80, "total_tokens": 84}
    assert sim_cut.engine.counters.finished_requests == 0  # the first server finished nothing
    assert sim_good.engine.counters.finished_requests == 2  # one continuation per choice
    metrics = front.metrics.render().decode()
    assert 'mvllm_frontdoor_continued_streams_total{model="sim"} 2.0' in metrics


async def test_a_chat_stream_goes_on_without_the_token_ids_it_did_not_ask_for(
    door: Open, start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    cutting, _ = await start_sim("--time-scale", "0", "--drop-rate", "1")
    good, _ = await start_sim("--time-scale", "0")
    url, table, _ = await door([("sim", cutting, ""), ("sim", good, "")])
    busy(table, good, 3)
    chat = {**STREAM, "messages": [{"role": "user", "content": "Tell me a story"}]}
    del chat["prompt"]
    chunks = [c for c in await events(http, f"{url}/v1/chat/completions", chat) if c != "[DONE]"]
    assert not [c for c in chunks if "error" in c], chunks
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert not [c for c in chunks if "prompt_token_ids" in c or any("token_ids" in x for x in c["choices"])]
    (mine,) = choices(chunks).values()
    assert mine["reasons"] == ["length"] and len(mine["text"].split()) == 40  # the simulator's tokens are words
    assert chunks[-1]["usage"]["completion_tokens"] == 40


async def test_a_stream_that_cannot_be_continued_ends_with_an_error_event(
    door: Open, start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    cutting, _ = await start_sim("--time-scale", "0", "--drop-rate", "1")
    good, sim_good = await start_sim("--time-scale", "0")
    url, table, front = await door([("sim", cutting, ""), ("sim", good, "")])
    busy(table, good, 3)
    got = await events(http, f"{url}/v1/completions", {**STREAM, "seed": 7})  # seeded: a rerun must match
    assert got[-1] == "[DONE]" and got[-2]["error"]["code"] == 500
    assert sim_good.engine.counters.finished_requests == 0
    assert 'mvllm_frontdoor_stream_errors_total{model="sim"} 1.0' in front.metrics.render().decode()


async def test_a_stream_on_a_server_taken_out_as_hung_goes_on_elsewhere(
    door: Open, start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    # Real time, so that the stream is mid-way when its server's engine stops (at its second request).
    hanging, _ = await start_sim("--time-scale", "1", "--hang-after-requests", "2")
    good, sim_good = await start_sim("--time-scale", "0")
    url, table, front = await door([("sim", hanging, ""), ("sim", good, "")], hang_timeout_s=2.0)
    load = busy(table, good, 3)
    body = {**STREAM, "max_tokens": 300, "return_token_ids": True}
    async with http.post(f"{url}/v1/completions", json=body) as response:
        first = await response.content.readuntil(b"\n\n")  # begun on the server that is about to hang
        for flight in load:  # (that load must not look like a hang of its own)
            table.land("sim", flight, None)
        stopper = asyncio.ensure_future(http.post(f"{hanging}/v1/completions", json={"model": "sim", "prompt": "x"}))
        rest = (await response.read()).decode()
    stopper.cancel()
    await asyncio.gather(stopper, return_exceptions=True)
    payloads = [line[6:] for line in (first.decode() + rest).split("\n") if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert not [c for c in chunks if "error" in c], chunks[-3:]
    (mine,) = choices(chunks).values()
    assert len(mine["ids"]) == 300 and token_ids(mine["text"]) == mine["ids"] and mine["reasons"] == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 300
    assert sim_good.engine.counters.finished_requests == 1
    assert f'mvllm_server_hangs_total{{server="{hanging}"}} 1.0' in front.metrics.render().decode()


async def test_a_client_that_leaves_cancels_its_request_upstream(
    door: Open, start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    slow, sim = await start_sim("--time-scale", "1")
    url, _, _ = await door([("sim", slow, "")])
    body = {**STREAM, "max_tokens": 5000}
    async with http.post(f"{url}/v1/completions", json=body) as response:
        await response.content.readuntil(b"\n\n")
        response.close()  # the client leaves mid-stream
    for _ in range(200):  # the upstream connection closes, and the server aborts the request
        if sim.metrics.finished["abort"]:
            break
        await asyncio.sleep(0.05)
    assert sim.metrics.finished["abort"] == 1
    assert sim.engine.counters.finished_requests == 0
