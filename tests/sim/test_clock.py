"""The simulated clock on /metrics (mvllm_sim:clock_seconds): the engine's step clock while it works, so
tokens over clock between two scrapes is the model's tokens per simulated second at any --time-scale;
while idle, wall time / --time-scale; with --time-scale 0, the summed step times."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import pytest

from mvllm_sim.engine import Engine, SimRequest
from mvllm_sim.profiles import step_model
from mvllm_sim.runner import Runner
from mvllm_sim.text import token_ids

from simkit import StartSim

CLOCK, TOKENS, STEPS = "mvllm_sim:clock_seconds", "vllm:generation_tokens_total", "mvllm_sim:engine_steps_total"
PROMPTS = [f"Question {i}: " + " ".join(f"w{i}x{j}" for j in range(20 + 7 * i)) for i in range(24)]
OUTPUT = 400
BATCH = {"model": "sim", "prompt": PROMPTS, "max_tokens": OUTPUT, "ignore_eos": True}


async def scrape(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            values.setdefault(line.split("{", 1)[0], float(line.rsplit(" ", 1)[1]))
    return values


async def timed_scrape(http: aiohttp.ClientSession, base: str) -> tuple[float, dict[str, float], float]:
    """A scrape with the wall clock read just before and just after it."""
    before = time.monotonic()
    values = await scrape(http, base)
    return before, values, time.monotonic()


def model_trajectory() -> list[tuple[float, float]]:
    """(generated tokens, simulated seconds) after each step, from 0, of h100-8b's engine on BATCH."""
    model = step_model("h100-8b")
    engine = Engine(model, model.max_num_seqs, model.max_num_batched_tokens, model.kv_tokens)
    for prompt in PROMPTS:
        engine.add(SimRequest(prompt_ids=token_ids(prompt), targets=[OUTPUT]))
    points = [(0.0, 0.0)]
    while engine.step() is not None:
        points.append((float(engine.counters.generation_tokens), engine.now))
    return points


async def scrape_while(http: aiohttp.ClientSession, base: str, work: asyncio.Task[Any]) -> list[dict[str, float]]:
    samples = []
    while not work.done():
        samples.append(await scrape(http, base))
    await work
    return samples


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with http.post(url, json=body) as r:
        await r.read()
        return r.status


@pytest.mark.parametrize("time_scale", ["0", "0.05"])
async def test_tokens_over_the_clock_are_the_model_s_at_any_time_scale(
    start_sim: StartSim, http: aiohttp.ClientSession, time_scale: str
) -> None:
    """Every scrape taken while the batch runs shows, after k steps, the model's tokens after k steps and
    the model's clock after k steps plus one constant: where the clock stood when the batch began (0 at
    time scale 0, where idle time does not count). So any two scrapes give the model's tokens per
    simulated second, exactly, whatever the time scale and however busy the machine."""
    base, _ = await start_sim("--time-scale", time_scale)
    points = model_trajectory()
    work = asyncio.create_task(post(http, f"{base}/v1/completions", BATCH))
    samples = await scrape_while(http, base, work)
    assert work.result() == 200
    busy = [s for s in samples if 0 < s[STEPS] < len(points) - 1]
    assert len(busy) >= 3, len(busy)
    offsets = []
    for s in busy:
        tokens, clock = points[int(s[STEPS])]
        assert s[TOKENS] == tokens
        offsets.append(s[CLOCK] - clock)
    assert max(offsets) - min(offsets) == pytest.approx(0, abs=1e-9)
    if time_scale == "0":
        assert offsets[0] == pytest.approx(0, abs=1e-12)
    first, last = busy[0], busy[-1]
    measured = (last[TOKENS] - first[TOKENS]) / (last[CLOCK] - first[CLOCK])
    (t0, c0), (t1, c1) = points[int(first[STEPS])], points[int(last[STEPS])]
    assert measured == pytest.approx((t1 - t0) / (c1 - c0), rel=1e-9)


async def test_at_time_scale_0_the_clock_is_the_summed_step_times_and_idle_time_does_not_count(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    base, server = await start_sim("--time-scale", "0")
    assert (await scrape(http, base))[CLOCK] == 0.0
    assert await post(http, f"{base}/v1/completions", BATCH) == 200
    end = (await scrape(http, base))[CLOCK]
    assert end == server.engine.now == pytest.approx(model_trajectory()[-1][1], rel=1e-12)
    await asyncio.sleep(0.05)
    assert (await scrape(http, base))[CLOCK] == end


async def test_an_idle_clock_follows_wall_time_over_the_time_scale(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    """Bounded by the wall clock read around each scrape: no timing tolerance."""
    scale = 0.01
    base, _ = await start_sim("--time-scale", str(scale))
    before1, first, after1 = await timed_scrape(http, base)
    await asyncio.sleep(0.1)
    before2, second, after2 = await timed_scrape(http, base)
    assert (before2 - after1) / scale <= second[CLOCK] - first[CLOCK] <= (after2 - before1) / scale


async def test_the_clock_never_goes_back_through_busy_idle_busy_even_when_the_cpu_falls_behind(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    """At a time scale this machine cannot keep up with, the steps fall behind the wall clock; when the
    engine then stands idle its clock goes on from where the steps left it, and never back."""
    base, _ = await start_sim("--time-scale", "0.0002")
    clocks: list[float] = []
    for _ in range(2):
        work = asyncio.create_task(post(http, f"{base}/v1/completions", BATCH))
        clocks += [s[CLOCK] for s in await scrape_while(http, base, work)]
        for _ in range(20):  # idle
            clocks.append((await scrape(http, base))[CLOCK])
    assert len(clocks) > 40
    assert clocks == sorted(clocks)
    assert clocks[-1] > clocks[0]


async def test_when_the_steps_fall_behind_the_wall_clock_the_lag_does_not_count_as_idle_time(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    """At 0.0002 wall seconds per simulated second the batch's 3.5 simulated seconds would take 0.7 ms:
    the CPU cannot keep up, and the steps end far behind wall time / time scale. The idle clock goes on
    from where the steps ended; it does not jump to where the wall clock would have put it."""
    scale = 0.0002
    base, server = await start_sim("--time-scale", str(scale))
    points = model_trajectory()
    work = asyncio.create_task(post(http, f"{base}/v1/completions", BATCH))
    started = time.monotonic()
    last_busy = started  # the wall time just before the last scrape that found the engine stepping
    while not work.done():
        before = time.monotonic()
        if (await scrape(http, base))[STEPS] < len(points) - 1:
            last_busy = before
    await work
    idle = (await scrape(http, base))[CLOCK]
    after = time.monotonic()
    assert (after - started) / scale > 10 * points[-1][1]  # the steps fell far behind the wall clock
    steps_ended = server.engine.now
    assert steps_ended <= idle <= steps_ended + (after - last_busy) / scale


async def test_a_hung_engine_s_clock_goes_on_while_its_tokens_stop(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    scale = 0.01
    base, server = await start_sim("--time-scale", str(scale))
    work = asyncio.create_task(post(http, f"{base}/v1/completions", BATCH))
    while (await scrape(http, base))[STEPS] < 10:
        pass
    server.hang()
    await asyncio.sleep(0.01)
    _, first, after1 = await timed_scrape(http, base)
    await asyncio.sleep(0.1)
    before2, second, _ = await timed_scrape(http, base)
    assert second[TOKENS] == first[TOKENS] and second[STEPS] == first[STEPS]
    assert second[CLOCK] - first[CLOCK] >= (before2 - after1) / scale > 0
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work


async def test_a_burst_that_reaches_an_idle_engine_is_admitted_when_it_arrives() -> None:
    """Requests that reach an idle engine while the process is busy elsewhere (a starved host, whose loop
    comes round late) are admitted at the first one's arrival, as vLLM's busy loop admits them: their
    time in the queue is the model's, none, not the host's delay over the time scale. (It was: a job's
    first requests, sent to an idle simulator on a loaded CI machine, showed 25-42 ms each of queue time,
    which a test of the front door's reserve read as an agent's request waiting behind the job.)"""
    model = step_model("h100-8b")
    engine = Engine(model, model.max_num_seqs, model.max_num_batched_tokens, model.kv_tokens)
    finished: list[SimRequest] = []
    engine.on_finish = finished.append
    runner = Runner(engine, time_scale=0.2)
    loop = asyncio.create_task(runner.run())
    try:
        await asyncio.sleep(0.05)  # idle
        burst = [SimRequest(prompt_ids=token_ids(f"prompt {i}"), targets=[4]) for i in range(8)]
        for request in burst:
            runner.submit(request)
            time.sleep(0.01)  # the loop cannot come round meanwhile: 10 ms of wall time, 50 ms simulated
        while len(finished) < len(burst):
            await asyncio.sleep(0.01)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert [r.scheduled_at for r in burst] == [r.arrival for r in burst]
    assert len({r.arrival for r in burst}) == 1
