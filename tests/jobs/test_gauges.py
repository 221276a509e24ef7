"""Reading a server's load from its Prometheus /metrics: vLLM's text format, and a real simulator."""

from __future__ import annotations

import aiohttp
import pytest

from mvllmd.jobs.gauges import GENERATED, RUNNING, WAITING, Gauges, parse, scrape

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
    gauges.fail()
    assert not gauges.ok and gauges.waiting_polls == 0


async def test_scrape_reads_a_real_simulator(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    url, server = await start_sim("--time-scale", "0")
    values = await scrape(http, url)
    assert values[RUNNING] == 0 and values[WAITING] == 0
    async with http.post(f"{url}/v1/completions", json={"model": "sim", "prompt": "hi", "max_tokens": 5}) as r:
        assert r.status == 200
    assert (await scrape(http, url))[GENERATED] == server.engine.counters.generation_tokens > 0


async def test_scrape_refuses_a_server_without_vllm_gauges(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    url, _ = await start_sim("--time-scale", "0")
    with pytest.raises(ValueError, match="HTTP 404"):
        await scrape(http, url + "/v1")  # /v1/metrics: not found
