"""The dispatcher against real (simulated) servers: every sample exactly once, through failures."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mvllm.jobs import JobSpec, Policy, Sample, Sampling
from mvllm_sim.text import token_ids
from mvllmd.dispatch import tail
from mvllmd.dispatch.endpoints import Endpoints, Tuning
from mvllmd.dispatch.flights import Lane, Work
from mvllmd.dispatch.loop import Dispatcher
from mvllmd.dispatch.tail import HEDGE_BUDGET
from mvllmd.jobs.output import DoneMap

from simkit import SimProcess, StartSim

PROMPTS, SAMPLES = 120, 4
CHECK_DELAY_S = 1.5  # longer than the slow server's chunks (64 tokens a choice) take


def job(max_tokens: int, seed: int | None = None, return_token_ids: bool = False, **kw: Any) -> JobSpec:
    """A job as the dispatcher reads one: its model, sampling, policy, hedging and max_concurrent."""
    sampling = Sampling(max_tokens=max_tokens, seed=seed, return_token_ids=return_token_ids)
    return JobSpec(Path("/in.parquet"), Path("/out.parquet"), model="sim", sampling=sampling, **kw)


def tuning(**settings: float) -> Tuning:
    return Tuning(**{"hang_timeout_s": 60.0, **settings})  # type: ignore[arg-type]


async def run_job(
    urls: list[str],
    policy: Policy = Policy.LEAST_LOADED,
    max_tokens: int = 8,
    watch: Callable[[Dispatcher, Endpoints], Awaitable[None]] | None = None,
    seed: int | None = None,
    return_token_ids: bool = False,
    hedge: bool = True,
    gauged: bool = False,
    **settings: float,
) -> tuple[list[Sample], Dispatcher]:
    """Run a job of PROMPTS x SAMPLES over `urls`; with `gauged`, the work is added only once every
    server's gauges have been read (a short job may otherwise end before the first reading)."""
    done = DoneMap(PROMPTS, SAMPLES)
    delivered: list[Sample] = []

    async def deliver(samples: list[Sample]) -> None:
        for s in samples:
            assert done.mark(s.prompt_index, s.sample_index), "a sample delivered twice"
        delivered.extend(samples)

    endpoints = Endpoints(tuning(**settings))
    spec = job(max_tokens, seed=seed, return_token_ids=return_token_ids, policy=policy, hedge=hedge, max_concurrent=256)
    dispatcher = Dispatcher(spec, endpoints, deliver, done.is_done)
    for url in urls:
        dispatcher.join(url, capacity=64)
    while gauged and not all(lane.endpoint.gauges.ok for lane in dispatcher.lanes()):
        await asyncio.sleep(0.01)
    for p in range(PROMPTS):
        dispatcher.add(Work(p, f"prompt number {p}", list(range(SAMPLES))))
    dispatcher.close_input()
    watcher = asyncio.create_task(watch(dispatcher, endpoints)) if watch else None
    try:
        await dispatcher.run()
    finally:
        if watcher is not None:
            watcher.cancel()
        await endpoints.close()
    assert done.count == PROMPTS * SAMPLES
    assert dispatcher.inflight == 0 and all(lane.inflight == lane.endpoint.inflight == 0 for lane in dispatcher.lanes())
    return delivered, dispatcher


def lane_of(dispatcher: Dispatcher, url: str) -> Lane:
    return next(lane for lane in dispatcher.lanes() if lane.url == url)


def deliver_to(done: DoneMap) -> Callable[[list[Sample]], Awaitable[None]]:
    async def deliver(samples: list[Sample]) -> None:
        for s in samples:
            assert done.mark(s.prompt_index, s.sample_index), "a sample delivered twice"

    return deliver


def by_endpoint(samples: list[Sample]) -> Counter[str]:
    return Counter(s.endpoint for s in samples if s.error is None)


async def test_every_sample_once_under_both_policies(start_sim: StartSim) -> None:
    urls = [(await start_sim("--time-scale", "0.001"))[0] for _ in range(3)]
    for policy in Policy:
        samples, _ = await run_job(urls, policy)
        assert all(s.error is None for s in samples)
        assert set(by_endpoint(samples)) == set(urls)


async def test_an_endpoint_answering_500s_is_worked_around(start_sim: StartSim) -> None:
    good = (await start_sim("--time-scale", "0"))[0]
    bad = (await start_sim("--time-scale", "0", "--error-rate", "1", "--error-status", "500"))[0]
    samples, dispatcher = await run_job([good, bad], breaker_cooldown_s=0.2)
    assert all(s.error is None for s in samples)
    assert by_endpoint(samples) == Counter({good: PROMPTS * SAMPLES})
    assert lane_of(dispatcher, bad).endpoint.out  # the breaker took it out


async def test_a_dead_endpoint_is_worked_around(start_sim: StartSim) -> None:
    good = (await start_sim("--time-scale", "0"))[0]
    samples, _ = await run_job([good, "http://127.0.0.1:9"], breaker_cooldown_s=0.2)
    assert all(s.error is None for s in samples)


# Unseeded, a job's short requests to one server travel as one (transport/batches.py): the hung
# server's first 4 requests may hold many prompts each. Seeded, a request holds one prompt.
ONE_PROMPT_A_REQUEST = pytest.mark.parametrize("seed", [None, 7], ids=["batched", "one-prompt-a-request"])


def answered_before_the_hang(samples: list[Sample], good: str, seed: int | None) -> None:
    """Every sample once (deliver checks it) and none failed; with one prompt a request, the hung
    server (--hang-after-requests 5) answered at most its first 4."""
    assert all(s.error is None for s in samples)
    assert len(samples) == PROMPTS * SAMPLES
    if seed is not None:
        assert by_endpoint(samples)[good] >= PROMPTS * SAMPLES - 4 * SAMPLES


@ONE_PROMPT_A_REQUEST
async def test_a_hung_endpoint_loses_nothing(start_sim: StartSim, seed: int | None) -> None:
    good = (await start_sim("--time-scale", "0.001"))[0]
    hung = (await start_sim("--time-scale", "0.001", "--hang-after-requests", "5"))[0]
    samples, _ = await run_job([good, hung], hang_timeout_s=1.0, seed=seed)
    answered_before_the_hang(samples, good, seed)


@ONE_PROMPT_A_REQUEST
async def test_a_hung_endpoint_is_found_from_its_metrics(
    start_sim: StartSim, caplog: pytest.LogCaptureFixture, seed: int | None
) -> None:
    # The fallback waits 10 minutes: the job ends because the hung server's token counters stood still.
    good = (await start_sim("--time-scale", "0.001"))[0]
    hung = (await start_sim("--time-scale", "0.001", "--hang-after-requests", "5"))[0]
    job = run_job([good, hung], hang_timeout_s=600.0, stall_s=0.5, metrics_interval_s=0.1, seed=seed)
    samples, _ = await asyncio.wait_for(job, 60)
    answered_before_the_hang(samples, good, seed)
    assert f"endpoint {hung}: its /metrics shows no token made for" in caplog.text


async def test_an_endpoint_wrongly_taken_for_hung_comes_back(start_sim: StartSim) -> None:
    # A stalled machine can make a healthy server look hung (CI saw both of a job's servers taken out
    # at once). Back from its cooldown it must be judged on its new requests, not on its last answer
    # from before the cooldown: else it was taken out again at once, for ever, and the job never ended.
    # Its requests take 0.7 s (100 tokens at full speed): longer than the hang watch waits between
    # checks (0.25 s), so checks land while the first requests after the cooldown run.
    good = (await start_sim("--time-scale", "1"))[0]
    alarms: list[bool] = []

    async def false_alarm(dispatcher: Dispatcher, endpoints: Endpoints) -> None:
        lane = dispatcher.lanes()[0]
        while not lane.requests:
            await asyncio.sleep(0.001)
        endpoint = lane.endpoint
        endpoint._last_completion -= 60  # as if the machine had stalled for a minute
        endpoint._busy_since -= 60
        endpoints._check_hangs()  # judged now, before an answer lands
        alarms.append(endpoint.out)

    job = run_job([good], max_tokens=100, hang_timeout_s=2.0, watch=false_alarm)
    samples, _ = await asyncio.wait_for(job, 40)
    assert alarms == [True]  # it was taken out ...
    assert len(samples) == PROMPTS * SAMPLES  # ... and came back to finish the job
    assert all(s.error is None for s in samples)


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
    # Unseeded, a copy is a new draw that races its original: at most 2% of the samples are copied.
    assert 0 < dispatcher.copied_samples <= HEDGE_BUDGET * PROMPTS * SAMPLES
    counts = by_endpoint(samples)
    assert counts[fast] > counts[slow]


async def test_seeded_copies_ask_for_the_same_samples(start_sim: StartSim) -> None:
    fast = (await start_sim("--time-scale", "0.001"))[0]
    slow = (await start_sim("--time-scale", "0.001", "--speed", "0.002"))[0]
    hedged, dispatcher = await run_job([fast, slow], max_tokens=200, seed=7)
    assert dispatcher.copied_samples > HEDGE_BUDGET * PROMPTS * SAMPLES  # no budget: a copy is the same sample
    assert dispatcher.moves == 0  # seeded, a sample is copied, never continued from a prefix
    plain, _ = await run_job([fast], max_tokens=200, seed=7)  # one server: nothing is copied
    assert {(s.prompt_index, s.sample_index): s.response for s in hedged} == {
        (s.prompt_index, s.sample_index): s.response for s in plain
    }


async def test_the_tail_moves_samples_to_fast_endpoints_as_the_same_samples(start_sim: StartSim) -> None:
    """Unseeded, with no stop strings and max_tokens 400, requests stream and the tail moves running
    samples from the slow endpoint to the fast one, each continued from the tokens it made: every
    sample once, each one whole (its text, its token ids and its count agree: the simulator's words are
    one token each), and none copied. A step takes the slow one 1000 times longer: the fast one's rate is
    bound by its CPU (about 3 times the slow one's at a step 100 times longer, too close to MOVE_GAIN
    on a loaded machine), the slow one's by its simulated clock (about 40 times fewer tokens a second)."""
    fast = (await start_sim("--time-scale", "0.001"))[0]
    slow = (await start_sim("--time-scale", "0.001", "--speed", "0.001"))[0]
    samples, dispatcher = await run_job([fast, slow], max_tokens=400, return_token_ids=True, metrics_interval_s=0.02)
    assert dispatcher.moves > 0 and dispatcher.hedges == 0
    for s in samples:
        assert s.error is None and s.response and s.finish_reason in {"stop", "length"}
        assert s.completion_tokens == len(s.response.split()) == len(s.token_ids or []) <= 400
        assert s.token_ids == token_ids(s.response)
    assert sum(s.completion_tokens == 400 for s in samples) == sum(s.finish_reason == "length" for s in samples)


async def test_samples_that_go_on_during_the_check_move_from_what_was_checked(
    start_sim: StartSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast server's /detokenize answers late (a loaded machine, a host far away), so the slow
    server's streams go on during each check: a moved sample goes on from the tokens it had made when
    checked, those made during the check are made again, and each sample is whole. (When a check had to
    find the stream unchanged, nothing moved here: a fleet test on a loaded machine saw the same.)"""
    real = tail.ends_whole

    async def late(*args: Any, **kwargs: Any) -> bool:
        answer = await real(*args, **kwargs)
        await asyncio.sleep(CHECK_DELAY_S)  # the slow server streams its next chunks meanwhile
        return answer

    monkeypatch.setattr(tail, "ends_whole", late)
    fast = (await start_sim("--time-scale", "0.001"))[0]
    slow = (await start_sim("--time-scale", "0.001", "--speed", "0.001"))[0]
    samples, dispatcher = await run_job([fast, slow], max_tokens=400, return_token_ids=True, metrics_interval_s=0.02)
    assert dispatcher.moves > 0
    for s in samples:
        assert s.error is None and s.completion_tokens == len(s.response.split()) == len(s.token_ids or []) <= 400
        assert s.token_ids == token_ids(s.response)


async def test_a_dispatcher_cancelled_as_it_wakes_ends_without_its_requests(start_sim: StartSim) -> None:
    """Stopping (drop_backlog wakes the loop) and cancelled at once, as a trial of `mvllmctl tune` stops:
    the run ends cancelled, its requests cancelled, nothing delivered. (On Python 3.11, asyncio.wait_for
    swallowed a cancel that met the wake, and the loop ran on until its requests finished.)"""
    slow = (await start_sim("--time-scale", "1"))[0]  # a token each few ms of simulated = wall time
    delivered: list[Sample] = []

    async def deliver(samples: list[Sample]) -> None:
        delivered.extend(samples)

    endpoints = Endpoints(tuning())
    dispatcher = Dispatcher(job(100_000, max_concurrent=64), endpoints, deliver, lambda p, s: False)
    dispatcher.join(slow, capacity=64)
    for p in range(8):
        dispatcher.add(Work(p, f"prompt number {p}", [0]))
    running = asyncio.create_task(dispatcher.run())
    while dispatcher.inflight < 8:
        await asyncio.sleep(0.01)
    dispatcher.drop_backlog()
    running.cancel()
    ended, _ = await asyncio.wait({running}, timeout=60)  # a bound for a broken build, not a timing
    assert running in ended and running.cancelled()
    assert dispatcher.inflight == 0 and not delivered
    await endpoints.close()


async def test_no_hedge_copies_nothing(start_sim: StartSim) -> None:
    fast = (await start_sim("--time-scale", "0.001"))[0]
    slow = (await start_sim("--time-scale", "0.001", "--speed", "0.002"))[0]
    samples, dispatcher = await run_job([fast, slow], max_tokens=64, hedge=False)
    assert dispatcher.hedges == 0
    assert len(samples) == PROMPTS * SAMPLES


async def test_a_server_that_queues_is_sent_about_what_it_runs(sim_process: Callable[..., SimProcess]) -> None:
    # The server runs 4 sequences at a time; the endpoint says 32: its waiting gauge shows the rest queue.
    server = sim_process("--time-scale", "0.1", "--max-num-seqs", "4", "--log-level", "warning")
    server.wait_listening()
    url = server.url
    done = DoneMap(PROMPTS, SAMPLES)

    async def deliver(samples: list[Sample]) -> None:
        for s in samples:
            assert done.mark(s.prompt_index, s.sample_index), "a sample delivered twice"

    # Another user of the server (another job, say) holds it throughout: its state outlives each job.
    endpoints = Endpoints(tuning(metrics_interval_s=0.02))
    endpoint = endpoints.join(url, capacity=64)
    dispatcher = Dispatcher(job(16, max_concurrent=256), endpoints, deliver, done.is_done)
    dispatcher.join(url, capacity=64)  # each of the two users may hold half of it: 32
    for p in range(PROMPTS):
        dispatcher.add(Work(p, f"prompt number {p}", list(range(SAMPLES))))
    dispatcher.close_input()
    limits: list[int] = []

    async def watch() -> None:
        while True:
            limits.append(endpoint.limit)
            assert endpoint.inflight <= endpoint.capacity
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    await dispatcher.run()
    assert not watcher.done()  # its checks held throughout
    watcher.cancel()
    assert done.count == PROMPTS * SAMPLES
    assert endpoint.gauges.ok
    assert min(limits) <= 8  # lowered toward the 4 it runs
    # A next job sends it less than it runs (2 long samples): nothing waits there, and the limit grows back.
    lowered = endpoint.limit
    small = DoneMap(1, 2)
    again = Dispatcher(job(200, max_concurrent=256), endpoints, deliver_to(small), small.is_done)
    again.join(url, capacity=64)
    again.add(Work(0, "one more prompt", [0, 1]))
    again.close_input()
    await again.run()
    await endpoints.close()
    assert small.count == 2
    assert endpoint.limit > lowered or lowered == endpoint.capacity > min(limits)  # (or it grew back already)


async def test_other_clients_sequences_count_as_load(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    busy, server = await start_sim("--time-scale", "0.02")
    idle, idle_server = await start_sim("--time-scale", "0.02")
    # Another client's long request runs on `busy` the whole time (30,000 tokens: several seconds even
    # at this time scale, however slow the machine; it is cancelled at the end).
    body = {"model": "sim", "prompt": "other", "n": 48, "max_tokens": 30000, "ignore_eos": True}
    other = asyncio.create_task(http.post(f"{busy}/v1/completions", json=body))
    while server.engine.num_running < 48:
        await asyncio.sleep(0.01)
    # Our sequences running at each server, at most, as the job went (the other client's 48 aside).
    peaks = {busy: 0, idle: 0}
    engines = {busy: (server.engine, 48), idle: (idle_server.engine, 0)}

    async def watch(dispatcher: Dispatcher, _: Endpoints) -> None:
        while True:
            for url, (engine, others) in engines.items():
                peaks[url] = max(peaks[url], engine.num_running - others)
            await asyncio.sleep(0.002)

    samples, _ = await run_job([busy, idle], max_tokens=160, watch=watch, gauged=True, hedge=False,
                               metrics_interval_s=0.02)  # fmt: skip
    other.cancel()
    # Both have room for 64. The idle one was given all of it; the busy one, whose other 48 sequences
    # count, far less (a reading may undercount them while our requests are on their way).
    assert peaks[idle] >= 64
    assert peaks[busy] <= 64 - 16
    assert len(samples) == PROMPTS * SAMPLES


async def test_a_fault_of_its_own_stops_the_dispatcher_with_it(start_sim: StartSim) -> None:
    """What the dispatcher cannot handle (here: writing the answers fails, as on a full disk) ends
    run() with that error, so the job fails with a reason instead of missing samples quietly."""
    url, _ = await start_sim("--time-scale", "0")

    async def deliver(samples: list[Sample]) -> None:
        raise OSError(28, "No space left on device")

    done = DoneMap(PROMPTS, SAMPLES)
    endpoints = Endpoints(tuning())
    dispatcher = Dispatcher(job(4, max_concurrent=1024), endpoints, deliver, done.is_done)
    dispatcher.join(url, capacity=8)
    for p in range(PROMPTS):
        dispatcher.add(Work(p, f"prompt number {p}", list(range(SAMPLES))))
    dispatcher.close_input()
    with pytest.raises(OSError, match="No space left"):
        await asyncio.wait_for(dispatcher.run(), 30)
    await endpoints.close()
    assert done.count == 0
