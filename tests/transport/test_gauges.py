"""Reading a server's load from its Prometheus /metrics: vLLM's text format, and a real simulator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from mvllmd.transport.gauges import GENERATED, PROMPT, RUNNING, WAITING, Gauges, parse, scrape
from mvllmd.transport.http import Client, HttpError

from simkit import StartSim

# As vLLM 0.x serves it: one label set per engine, HELP and TYPE lines, other metrics around.
VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:num_requests_waiting_by_reason Not what we read.
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 99.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="a \\"quoted} name\\""} 1.5e3
vllm:generation_tokens_total{engine="1",model_name="m"} 500 1700000000000
process_cpu_seconds_total 12.5
"""


def test_parse_sums_each_metric_over_its_label_sets() -> None:
    assert parse(VLLM_TEXT) == {RUNNING: 17.0, WAITING: 3.0, GENERATED: 2000.0}


def test_parse_reads_unlabelled_samples_and_skips_bad_values() -> None:
    text = 'vllm:num_requests_running 4\nvllm:num_requests_waiting NaN\nvllm:num_requests_waiting{a="b"} x\n'
    assert parse(text) == {RUNNING: 4.0}


def test_two_readings_give_the_generation_rate_and_the_decode_step() -> None:
    gauges = Gauges()
    gauges.update({RUNNING: 10.0, WAITING: 2.0, GENERATED: 1000.0}, now=100.0)
    assert gauges.ok and gauges.step_s == 0  # one reading: no rate yet
    gauges.update({RUNNING: 30.0, WAITING: 4.0, GENERATED: 3000.0}, now=101.0)
    assert gauges.tokens_per_s == pytest.approx(2000.0)
    assert gauges.step_s == pytest.approx(20 / 2000)  # 20 sequences running on average
    assert gauges.waiting_polls == 2
    gauges.fail(now=102.0)
    assert not gauges.ok and gauges.waiting_polls == 0 and gauges.failed_since == 102.0
    gauges.fail(now=103.0)
    assert gauges.failed_since == 102.0  # since the first failure
    gauges.update({RUNNING: 1.0, WAITING: 0.0, GENERATED: 4500.0}, now=104.0)
    assert gauges.ok and gauges.failed_since == 0
    assert gauges.tokens_per_s == pytest.approx(500.0)  # over the gap, since the last reading that worked
    gauges.fail(now=105.0)
    gauges.update({RUNNING: 1.0, WAITING: 0.0, GENERATED: 20.0}, now=106.0)  # restarted: its counters anew
    assert gauges.tokens_per_s == pytest.approx(500.0)  # no rate from a counter that went back
    gauges.update({RUNNING: 1.0, WAITING: 0.0, GENERATED: 120.0}, now=107.0)
    assert gauges.tokens_per_s == pytest.approx(100.0)


def test_still_since_is_the_reading_that_first_showed_the_counters_as_they_are() -> None:
    gauges = Gauges()
    gauges.fail(now=1.0)
    assert gauges.failed_since == 0  # it never answered: no gauges, not silent
    gauges.update({RUNNING: 2.0, WAITING: 0.0, GENERATED: 10.0, PROMPT: 5.0}, now=2.0)
    assert gauges.still_since == 2.0
    gauges.update({RUNNING: 2.0, WAITING: 0.0, GENERATED: 10.0, PROMPT: 9.0}, now=3.0)  # a prefill
    assert gauges.still_since == 3.0
    gauges.update({RUNNING: 2.0, WAITING: 0.0, GENERATED: 10.0, PROMPT: 9.0}, now=4.0)
    gauges.update({RUNNING: 0.0, WAITING: 0.0, GENERATED: 10.0, PROMPT: 9.0}, now=5.0)
    assert gauges.still_since == 3.0 and gauges.at == 5.0


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    client = Client()
    yield client
    client.close()


async def test_scrape_reads_a_real_simulator(start_sim: StartSim, client: Client, http: aiohttp.ClientSession) -> None:
    url, server = await start_sim("--time-scale", "0")
    values = await scrape(client, url)
    assert values[RUNNING] == 0 and values[WAITING] == 0
    connection = client.pool(url)._idle[0]
    async with http.post(f"{url}/v1/completions", json={"model": "sim", "prompt": "hi", "max_tokens": 5}) as r:
        assert r.status == 200
    assert (await scrape(client, url))[GENERATED] == server.engine.counters.generation_tokens > 0
    assert client.pool(url)._idle == [connection]  # the two readings went over one keep-alive connection


async def test_scrape_refuses_a_server_without_vllm_gauges(start_sim: StartSim, client: Client) -> None:
    url, _ = await start_sim("--time-scale", "0")
    with pytest.raises(ValueError, match="HTTP 404"):
        await scrape(client, url + "/v1")  # /v1/metrics: not found


async def test_scrape_sends_the_key_and_fails_as_the_poller_expects(client: Client) -> None:
    """The dispatcher's poller counts HttpError, OSError, TimeoutError and ValueError as no gauges."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        if len(heads) == 1:
            text = b"vllm:num_requests_running 2\nvllm:num_requests_waiting 1\n"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(text), text))
        elif len(heads) == 2:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nnot \xff utf")  # not UTF-8
        elif len(heads) == 3:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\ncut")
        else:
            await reader.read()  # no answer
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        assert await scrape(client, url, api_key="k") == {RUNNING: 2.0, WAITING: 1.0}
        assert heads[0].startswith(b"GET /metrics HTTP/1.1\r\n") and b"\r\nAuthorization: Bearer k\r\n" in heads[0]
        with pytest.raises(ValueError, match="utf-8"):
            await scrape(client, url)
        with pytest.raises(HttpError, match="closed the connection"):
            await scrape(client, url)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await scrape(client, url, timeout_s=0.2)
        assert time.monotonic() - started < 2
    finally:
        server.close()
    with pytest.raises(OSError):
        await scrape(client, "http://127.0.0.1:9")
