"""The scheduler: batching limits, chunked prefill, KV pressure and preemption, prefix caching."""

from __future__ import annotations

from mvllm_sim.engine import BLOCK, Engine, SimRequest
from mvllm_sim.profiles import step_model


def small_engine(kv_tokens: int = 460_000, max_num_seqs: int = 1024, budget: int = 8192) -> Engine:
    return Engine(step_model("h100-8b"), max_num_seqs, budget, kv_tokens)


def prompt(i: int, length: int) -> list[int]:
    return [i * 1_000_003 + j for j in range(length)]


def drain(engine: Engine, check: bool = True) -> None:
    while engine.step() is not None:
        if check:
            assert 0 <= engine.kv_usage <= 1.0
            assert engine.num_running <= engine.max_num_seqs


def test_every_request_gets_exactly_its_tokens() -> None:
    engine = small_engine()
    targets = [[1], [5, 9, 2], [40], [17, 17]]
    reqs = [engine.add(SimRequest(prompt_ids=prompt(i, 30 + i), targets=t)) for i, t in enumerate(targets)]
    drain(engine)
    assert all(r.state == "finished" for r in reqs)
    assert engine.counters.generation_tokens == sum(map(sum, targets))
    assert (engine.num_running, engine.num_waiting, engine.kv_usage) == (0, 0, 0)
    assert engine.idle


def test_max_num_seqs_bounds_the_batch() -> None:
    engine = small_engine(max_num_seqs=8)
    for i in range(20):
        engine.add(SimRequest(prompt_ids=prompt(i, 10), targets=[50]))
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (8, 12)
    drain(engine)


def test_chunked_prefill_splits_a_long_prompt() -> None:
    engine = small_engine(budget=1000)
    req = engine.add(SimRequest(prompt_ids=prompt(0, 2500), targets=[3]))
    steps = 0
    while req.first_token_at is None:
        engine.step()
        steps += 1
    assert steps == 3  # 1000 + 1000 + 500 prompt tokens, the last chunk samples the first token
    drain(engine)


def test_kv_pressure_preempts_the_newest_request_and_it_still_finishes() -> None:
    engine = small_engine(kv_tokens=1100)  # the three need 1,400 at their peak
    first = engine.add(SimRequest(prompt_ids=prompt(0, 300), targets=[300]))
    second = engine.add(SimRequest(prompt_ids=prompt(1, 300), targets=[300]))
    third = engine.add(SimRequest(prompt_ids=prompt(2, 100), targets=[100]))
    drain(engine)
    assert engine.counters.preemptions > 0
    assert first.preemptions == 0  # the oldest is never the victim while newer ones run
    assert second.preemptions + third.preemptions == engine.counters.preemptions
    assert all(r.state == "finished" for r in (first, second, third))
    assert engine.counters.generation_tokens == 700  # recompute keeps tokens: none generated twice
    assert engine.kv_usage == 0


def test_preempted_request_goes_back_to_the_head_of_the_queue() -> None:
    engine = small_engine(kv_tokens=700, max_num_seqs=2)
    engine.add(SimRequest(prompt_ids=prompt(0, 200), targets=[300]))
    b = engine.add(SimRequest(prompt_ids=prompt(1, 200), targets=[300]))
    c = engine.add(SimRequest(prompt_ids=prompt(2, 10), targets=[5]))
    while b.preemptions == 0:
        assert engine.step() is not None
    assert engine._waiting[0] is b and engine._waiting[1] is c  # b returns before c, which waited longer
    drain(engine)
    assert b.finished_at is not None and c.first_token_at is not None
    assert c.first_token_at > b.first_token_at  # type: ignore[operator]


def test_prefix_cache_reuses_a_repeated_prompt() -> None:
    engine = small_engine()
    shared = prompt(7, 10 * BLOCK + 5)  # 10 full blocks and a partial one
    first = engine.add(SimRequest(prompt_ids=shared, targets=[4]))
    drain(engine)
    second = engine.add(SimRequest(prompt_ids=shared, targets=[4]))
    drain(engine)
    assert first.cached_tokens == 0
    assert second.cached_tokens == 10 * BLOCK  # full blocks only; the tail is prefilled again
    assert engine.counters.prefix_cache_queries == 2 * len(shared)
    assert engine.counters.prefix_cache_hits == 10 * BLOCK
    ttft = [r.first_token_at - r.arrival for r in (first, second)]  # type: ignore[operator]
    assert ttft[1] < ttft[0]


def test_prefix_cache_matches_a_shared_prefix_only() -> None:
    engine = small_engine()
    engine.add(SimRequest(prompt_ids=prompt(1, 64) + prompt(2, 64), targets=[1]))
    drain(engine)
    other = engine.add(SimRequest(prompt_ids=prompt(1, 64) + prompt(3, 64), targets=[1]))
    drain(engine)
    assert other.cached_tokens == 64  # the common first 4 blocks; the chain breaks after them


def test_n_siblings_prefill_once_and_share_the_prompt_kv() -> None:
    one = small_engine()
    single = one.add(SimRequest(prompt_ids=prompt(0, 4000), targets=[10]))
    many = small_engine()
    four = many.add(SimRequest(prompt_ids=prompt(0, 4000), targets=[10, 10, 10, 10]))
    for engine in (one, many):
        while engine.step() is not None and engine.counters.generation_tokens == 0:
            pass
    assert many.counters.prompt_tokens == 4000  # not 16,000
    assert four.first_token_at is not None and single.first_token_at is not None
    assert four.first_token_at - single.first_token_at < 0.01 * single.first_token_at
    assert many.kv_usage * many.kv_capacity < 4000 + 4 * 16  # one copy of the prompt
    drain(one)
    drain(many)


def test_cached_blocks_are_evicted_when_space_is_needed() -> None:
    engine = small_engine(kv_tokens=40 * BLOCK)
    engine.add(SimRequest(prompt_ids=prompt(1, 30 * BLOCK), targets=[1]))
    drain(engine)
    engine.add(SimRequest(prompt_ids=prompt(2, 30 * BLOCK), targets=[1]))  # needs most of the cache
    drain(engine)
    again = engine.add(SimRequest(prompt_ids=prompt(1, 30 * BLOCK), targets=[1]))
    drain(engine)
    # 20 of the first prompt's blocks made room for the second's: its last 20, so its first 10 still match.
    assert again.cached_tokens == 10 * BLOCK


def test_abort_frees_everything() -> None:
    engine = small_engine(max_num_seqs=4)
    running = engine.add(SimRequest(prompt_ids=prompt(0, 100), targets=[100, 100]))
    waiting = engine.add(SimRequest(prompt_ids=prompt(1, 100), targets=[100, 100, 100]))
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 3)
    engine.abort(running)
    engine.abort(waiting)
    assert (engine.num_running, engine.num_waiting, engine.kv_usage) == (0, 0, 0)
    assert engine.step() is None
