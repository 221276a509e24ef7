"""h100-70b's KV cache per TP size, read off the server: at TP2 the weights leave room for 2,736 tokens,
and the batch is what that holds (the rest wait, as in vLLM's scheduler); at TP4 the same batch runs
whole. Gauges and the simulated clock only, at time scale 0: nothing here depends on wall time."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from simkit import StartSim

PROMPT_TOKENS, OUTPUT = 403, 200
PROMPTS = [f"Question {i}: " + " ".join(f"w{i}x{j}" for j in range(PROMPT_TOKENS - 3)) for i in range(16)]
BATCH = {"model": "sim", "prompt": PROMPTS, "max_tokens": OUTPUT, "ignore_eos": True}
RUNNING, WAITING, USAGE = "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"


async def scrape(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            values.setdefault(line.split("{", 1)[0], float(line.rsplit(" ", 1)[1]))
    return values


async def run_batch(start_sim: StartSim, http: aiohttp.ClientSession, tp: str) -> tuple[list[dict[str, float]], Any]:
    """The batch on h100-70b at `tp`: the scrapes taken while it ran, and the completion."""
    base, _ = await start_sim("--profile", "h100-70b", "-tp", tp, "--max-model-len", "auto", "--time-scale", "0")

    async def post() -> Any:
        async with http.post(f"{base}/v1/completions", json=BATCH) as r:
            assert r.status == 200
            return await r.json()

    work = asyncio.create_task(post())
    samples = []
    while not work.done():
        samples.append(await scrape(http, base))
    samples.append(await scrape(http, base))
    return samples, await work


async def test_70b_at_tp2_runs_the_batch_its_small_kv_cache_holds(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    samples, body = await run_batch(start_sim, http, "2")
    assert body["usage"]["completion_tokens"] == len(PROMPTS) * OUTPUT  # every request ends, whole
    running = [s[RUNNING] for s in samples]
    assert 1 < max(running) <= 2_736 // PROMPT_TOKENS  # each running request holds its prompt's KV at least
    assert any(s[WAITING] > 0 and s[RUNNING] > 0 for s in samples)  # the rest wait for room
    assert all(s[USAGE] <= 1.0 for s in samples) and max(s[USAGE] for s in samples) > 0.8


async def test_70b_at_tp4_runs_the_same_batch_whole_and_makes_more_tokens_per_simulated_second(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    tp2, _ = await run_batch(start_sim, http, "2")
    tp4, _ = await run_batch(start_sim, http, "4")
    assert max(s[RUNNING] for s in tp4) == len(PROMPTS)
    assert all(s["vllm:num_preemptions_total"] == 0 for s in tp4)

    def rate(samples: list[dict[str, float]]) -> float:  # over the whole batch, on the simulated clock
        return samples[-1]["vllm:generation_tokens_total"] / samples[-1]["mvllm_sim:clock_seconds"]

    assert rate(tp4) > 3 * rate(tp2)
