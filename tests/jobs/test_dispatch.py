"""The dispatcher against real (simulated) servers: every sample exactly once, through failures."""

from __future__ import annotations

from collections import Counter

import aiohttp

from mvllmd.jobs.dispatch import Dispatcher, DispatchSettings, Endpoint, Policy, Work
from mvllmd.jobs.output import DoneMap, Sample
from mvllmd.jobs.requests import Sampling

from simkit import StartSim

PROMPTS, SAMPLES = 120, 4


async def run_job(
    urls: list[str], policy: Policy = "least-loaded", max_tokens: int = 8, **settings: float
) -> tuple[list[Sample], Dispatcher]:
    done = DoneMap(PROMPTS, SAMPLES)
    delivered: list[Sample] = []

    async def deliver(samples: list[Sample]) -> None:
        for s in samples:
            assert done.mark(s.prompt_index, s.sample_index), "a sample delivered twice"
        delivered.extend(samples)

    endpoints = [Endpoint(url, capacity=64) for url in urls]
    dispatcher = Dispatcher(
        endpoints,
        Sampling(model="sim", max_tokens=max_tokens),
        DispatchSettings(policy=policy, max_concurrent=256, **settings),  # type: ignore[arg-type]
        deliver,
        done.is_done,
    )
    for p in range(PROMPTS):
        dispatcher.add(Work(p, f"prompt number {p}", list(range(SAMPLES))))
    dispatcher.close_input()
    async with aiohttp.ClientSession() as session:
        await dispatcher.run(session)
    assert done.count == PROMPTS * SAMPLES
    return delivered, dispatcher


def by_endpoint(samples: list[Sample]) -> Counter[str]:
    return Counter(s.endpoint for s in samples if s.error is None)


async def test_every_sample_once_under_both_policies(start_sim: StartSim) -> None:
    urls = [(await start_sim("--time-scale", "0.001"))[0] for _ in range(3)]
    for policy in ("least-loaded", "round-robin"):
        samples, _ = await run_job(urls, policy)  # type: ignore[arg-type]
        assert all(s.error is None for s in samples)
        assert set(by_endpoint(samples)) == set(urls)


async def test_an_endpoint_answering_500s_is_worked_around(start_sim: StartSim) -> None:
    good = (await start_sim("--time-scale", "0"))[0]
    bad = (await start_sim("--time-scale", "0", "--error-rate", "1", "--error-status", "500"))[0]
    samples, dispatcher = await run_job([good, bad], breaker_cooldown_s=0.2)
    assert all(s.error is None for s in samples)
    assert by_endpoint(samples) == Counter({good: PROMPTS * SAMPLES})
    bad_endpoint = next(e for e in dispatcher.endpoints if e.url == bad)
    assert bad_endpoint.open_until > 0  # the breaker took it out


async def test_a_dead_endpoint_is_worked_around(start_sim: StartSim) -> None:
    good = (await start_sim("--time-scale", "0"))[0]
    samples, _ = await run_job([good, "http://127.0.0.1:9"], breaker_cooldown_s=0.2)
    assert all(s.error is None for s in samples)


async def test_a_hung_endpoint_loses_nothing(start_sim: StartSim) -> None:
    good = (await start_sim("--time-scale", "0.001"))[0]
    hung = (await start_sim("--time-scale", "0.001", "--hang-after-requests", "5"))[0]
    samples, _ = await run_job([good, hung], hang_timeout_s=1.0)
    assert all(s.error is None for s in samples)
    assert by_endpoint(samples)[good] >= PROMPTS * SAMPLES - 4 * SAMPLES  # at most the 4 answered before


async def test_permanent_failures_are_recorded_and_the_job_goes_on(start_sim: StartSim) -> None:
    base = (await start_sim("--time-scale", "0", "--max-model-len", "16"))[0]
    samples, _ = await run_job([base], max_tokens=20)  # 20 > the context of 16: refused, for good
    assert len(samples) == PROMPTS * SAMPLES
    assert all(s.error and "HTTP 400" in s.error for s in samples)


async def test_the_tail_is_hedged_onto_idle_fast_endpoints(start_sim: StartSim) -> None:
    fast = (await start_sim("--time-scale", "0.001"))[0]
    slow = (await start_sim("--time-scale", "0.001", "--speed", "0.002"))[0]  # 0.2 s of wall time per request
    samples, dispatcher = await run_job([fast, slow], max_tokens=64)
    assert dispatcher.hedges > 0
    counts = by_endpoint(samples)
    assert counts[fast] > counts[slow]
