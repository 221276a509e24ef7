"""Every fault kind: crash (after K requests, at a simulated time, on request), hang, drop, error
answers, slow start. Faults that end the process run mvllm-sim as a real process."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable

import aiohttp
import httpx
import pytest

from mvllm_sim.faults import CRASH_EXIT_STATUS, HEADER

from simkit import SimProcess, StartSim, completion_body

SHORT = aiohttp.ClientTimeout(total=1.0)


async def status_of(http: aiohttp.ClientSession, url: str, **kw: object) -> int:
    async with http.post(url, json=completion_body(), **kw) as r:  # type: ignore[arg-type]
        return r.status


async def gauge(http: aiohttp.ClientSession, base: str, name: str) -> float:
    async with http.get(f"{base}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(name)


async def test_hang_header_never_answers_but_health_and_others_do(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    base, _ = await start_sim("--time-scale", "0")
    url = f"{base}/v1/completions"
    with pytest.raises(asyncio.TimeoutError):
        await status_of(http, url, headers={HEADER: "hang"}, timeout=SHORT)
    async with http.get(f"{base}/health") as r:
        assert r.status == 200
    assert await status_of(http, url) == 200  # only that request hangs


async def test_hang_after_requests_freezes_the_engine(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0", "--hang-after-requests", "2")
    url = f"{base}/v1/completions"
    assert await status_of(http, url) == 200
    generated = await gauge(http, base, "vllm:generation_tokens_total")
    stuck = asyncio.create_task(status_of(http, url))  # the second request: accepted, never answered
    await asyncio.sleep(0.5)
    assert not stuck.done()
    async with http.get(f"{base}/health") as r:
        assert r.status == 200  # as vLLM's /health does while its engine is stuck
    # /metrics reads as vLLM's does while its worker is stopped: its gauges as they were when it hung
    # (idle: 0 and 0, though a request is stuck), and no token made.
    assert await gauge(http, base, "vllm:num_requests_waiting") == 0
    assert await gauge(http, base, "vllm:num_requests_running") == 0
    assert await gauge(http, base, "vllm:generation_tokens_total") == generated
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck


async def test_drop_before_the_answer(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0")
    with pytest.raises(aiohttp.ClientError):
        await status_of(http, f"{base}/v1/completions", headers={HEADER: "drop"})
    assert await status_of(http, f"{base}/v1/completions") == 200


async def test_drop_mid_stream(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0.001")
    body = completion_body(max_tokens=50, ignore_eos=True, stream=True)
    received: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(f"{base}/v1/completions", json=body, headers={HEADER: "drop-after=3"}) as r:
            assert r.status == 200
            async for line in r.content:
                if line.startswith(b"data: "):
                    received.append(line)
    assert len(received) == 3
    assert all(b"[DONE]" not in line for line in received)
    async with http.get(f"{base}/metrics") as r:  # the engine dropped the request too, as vLLM does
        assert 'vllm:num_requests_running{engine="0",model_name="sim"} 0.0' in await r.text()


@pytest.mark.parametrize("code", [429, 500, 503])
async def test_error_status_header(start_sim: StartSim, http: aiohttp.ClientSession, code: int) -> None:
    base, _ = await start_sim("--time-scale", "0")
    async with http.post(f"{base}/v1/completions", json=completion_body(), headers={HEADER: f"status={code}"}) as r:
        assert r.status == code
        assert (await r.json())["error"]["code"] == code


async def test_error_rate(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0", "--error-rate", "0.5", "--error-status", "429", "--fault-seed", "1")
    codes = [await status_of(http, f"{base}/v1/completions") for _ in range(40)]
    assert set(codes) == {200, 429}
    assert 8 <= codes.count(429) <= 32


async def test_unknown_fault_header_is_a_bad_request(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0")
    assert await status_of(http, f"{base}/v1/completions", headers={HEADER: "explode"}) == 400


async def test_slow_start_answers_503_first(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0", "--startup-delay", "0.6")
    async with http.get(f"{base}/health") as r:
        assert r.status == 503
    assert await status_of(http, f"{base}/v1/completions") == 503
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with http.get(f"{base}/health") as r:
            if r.status == 200:
                break
        await asyncio.sleep(0.1)
    assert await status_of(http, f"{base}/v1/completions") == 200


def test_slow_start_refuses_connections_first(sim_process: Callable[..., SimProcess]) -> None:
    sim = sim_process("--startup-delay", "1.0", "--startup-mode", "refuse")
    time.sleep(0.3)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", sim.port)) != 0  # refused while it "loads"
    sim.wait_listening()


def _post_sync(url: str, headers: dict[str, str] | None = None) -> int:
    async def go() -> int:
        async with aiohttp.ClientSession() as http:
            return await status_of(http, url, headers=headers or {})

    return asyncio.run(go())


def test_crash_after_requests(sim_process: Callable[..., SimProcess]) -> None:
    sim = sim_process("--time-scale", "0", "--crash-after-requests", "2")
    sim.wait_listening()
    assert [_post_sync(f"{sim.url}/v1/completions") for _ in range(2)] == [200, 200]
    with pytest.raises(aiohttp.ClientError):
        _post_sync(f"{sim.url}/v1/completions")
    assert sim.proc.wait(10) == CRASH_EXIT_STATUS


def test_crash_on_request(sim_process: Callable[..., SimProcess]) -> None:
    sim = sim_process("--time-scale", "0")
    sim.wait_listening()
    with pytest.raises(aiohttp.ClientError):
        _post_sync(f"{sim.url}/v1/completions", {HEADER: "crash"})
    assert sim.proc.wait(10) == CRASH_EXIT_STATUS


def test_crash_at_a_simulated_time(sim_process: Callable[..., SimProcess]) -> None:
    # At time scale 0.01, 30 simulated seconds are 0.3 s of wall time, idle or not.
    sim = sim_process("--time-scale", "0.01", "--crash-at", "30")
    assert sim.proc.wait(20) == CRASH_EXIT_STATUS


def test_sigusr1_hangs_the_engine_from_then_on(sim_process: Callable[..., SimProcess]) -> None:
    sim = sim_process("--time-scale", "0")
    sim.wait_listening()
    assert _post_sync(f"{sim.url}/v1/completions") == 200
    sim.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.3)  # the signal is handled by the sim's loop
    steps = _steps(sim.url)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{sim.url}/v1/completions", json=completion_body(), timeout=1.0)  # accepted, never answered
    assert httpx.get(f"{sim.url}/health").status_code == 200  # as vLLM's /health while its worker is stopped
    assert _steps(sim.url) == steps  # nothing was stepped for the request


def _steps(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    (line,) = [line for line in text.splitlines() if line.startswith("mvllm_sim:engine_steps_total{")]
    return float(line.rsplit(" ", 1)[1])
