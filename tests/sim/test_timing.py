"""The timing model, read off the simulated clock: exact and deterministic, not wall-clock timings."""

from __future__ import annotations

import pytest

from mvllm_sim.engine import Engine, SimRequest
from mvllm_sim.profiles import ProfileError, StepModel, step_model


def engine_for(model: StepModel, kv_tokens: int | None = None) -> Engine:
    return Engine(model, model.max_num_seqs, model.max_num_batched_tokens, kv_tokens or model.kv_tokens)


def run(engine: Engine) -> None:
    while engine.step() is not None:
        pass


def distinct_prompt(i: int, length: int) -> list[int]:
    return [i * 1_000_003 + j for j in range(length)]


def test_step_time_formula() -> None:
    m = step_model("h100-8b")
    # overhead + max(weight_read, per_token * tokens) + per_ctx_token * ctx + per_seq * B
    assert m.step_time(1, 1000, 1) == pytest.approx(0.0008 + 0.0060 + 60e-9 * 1000 + 4e-6)
    assert m.step_time(1000, 0, 10) == pytest.approx(0.0008 + 30e-6 * 1000 + 4e-6 * 10)
    assert step_model("h100-8b", speed=2).step_time(1, 0, 1) == pytest.approx(m.step_time(1, 0, 1) / 2)


def test_anchor_batch_1_about_6_9_ms_per_output_token() -> None:
    engine = engine_for(step_model("h100-8b"))
    req = engine.add(SimRequest(prompt_ids=distinct_prompt(0, 100), targets=[500]))
    run(engine)
    assert req.first_token_at is not None and req.finished_at is not None
    per_token = (req.finished_at - req.first_token_at) / (500 - 1)
    assert per_token == pytest.approx(6.9e-3, rel=0.15)


def test_anchor_batch_256_with_1500_token_contexts_about_7900_tokens_per_s() -> None:
    engine = engine_for(step_model("h100-8b"))
    # Prompts of 1,400 tokens and 200 output tokens: contexts run 1,400..1,600, 1,500 on average.
    reqs = [engine.add(SimRequest(prompt_ids=distinct_prompt(i, 1400), targets=[200])) for i in range(256)]
    while not all(r.first_token_at is not None for r in reqs):
        engine.step()
    start, tokens_before = engine.now, engine.counters.generation_tokens
    run(engine)
    throughput = (engine.counters.generation_tokens - tokens_before) / (engine.now - start)
    assert engine.counters.preemptions == 0  # the batch fits in the KV cache: a clean decode phase
    assert throughput == pytest.approx(7900, rel=0.15)


def test_tensor_parallel_variants() -> None:
    tp1, tp2, tp4, tp8 = (step_model("h100-8b", tp) for tp in (1, 2, 4, 8))
    single = [m.step_time(1, 1000, 1) for m in (tp1, tp2, tp4, tp8)]
    assert single == sorted(single, reverse=True)  # more GPUs: lower latency per token...
    assert single[0] / single[3] < 4  # ...but far from 8x: overhead and all-reduces do not shrink
    assert tp8.kv_tokens > tp4.kv_tokens > tp2.kv_tokens > tp1.kv_tokens


def test_data_parallel_beats_tensor_parallel_for_batch_throughput() -> None:
    # The seed's claim, in simulated time: 8 x TP1 against 1 x TP8, 512 requests of 512 tokens in, 256 out.
    def makespan(model: StepModel, requests: int) -> float:
        engine = engine_for(model)
        for i in range(requests):
            engine.add(SimRequest(prompt_ids=distinct_prompt(i, 512), targets=[256]))
        run(engine)
        return engine.now

    eight_tp1 = makespan(step_model("h100-8b", 1), 512 // 8)  # each of 8 servers takes an eighth
    one_tp8 = makespan(step_model("h100-8b", 8), 512)
    assert eight_tp1 < one_tp8


def test_kv_capacity_per_tp_size() -> None:
    # h100-8b: 460,000 tokens at TP1 and 520,000 more per further GPU (as given).
    assert [step_model("h100-8b", tp).kv_tokens for tp in (1, 2, 4, 8)] == [460_000, 980_000, 2_020_000, 4_100_000]
    # h100-70b, from memory: (80 GB * 0.9 - 141.1 GB / TP - activations) * TP / 320 KiB, in 16-token blocks.
    # TP1 has no room at all; TP2 (1.0 GB of activations) 0.45 GB a GPU: 2,736 tokens.
    assert [step_model("h100-70b", tp).kv_tokens for tp in (1, 2, 4, 8)] == [0, 2_736, 440_976, 1_317_440]
    assert step_model("h100-70b", 2).kv_tokens == int((72e9 - 141.1e9 / 2 - 1.0e9) * 2 / 327_680) // 16 * 16


def test_anchor_70b_at_tp4_batch_1_about_17_ms_per_output_token() -> None:
    engine = engine_for(step_model("h100-70b", 4))
    req = engine.add(SimRequest(prompt_ids=distinct_prompt(0, 100), targets=[500]))
    run(engine)
    assert req.first_token_at is not None and req.finished_at is not None
    per_token = (req.finished_at - req.first_token_at) / (500 - 1)
    assert per_token == pytest.approx(17e-3, rel=0.15)


def test_70b_tensor_parallel_variants() -> None:
    tp2, tp4, tp8 = (step_model("h100-70b", tp) for tp in (2, 4, 8))
    single = [m.step_time(1, 1000, 1) for m in (tp2, tp4, tp8)]
    assert single == sorted(single, reverse=True)
    assert single[0] == pytest.approx(29e-3, rel=0.05) and single[2] == pytest.approx(10.3e-3, rel=0.05)
    # A 70B step costs about 2.4 times an 8B one at TP1, as vLLM's own benchmark finds 2.5 (profiles.toml).
    assert single[1] / step_model("h100-8b").step_time(1, 1000, 1) == pytest.approx(2.5, rel=0.1)


def test_unknown_profile_and_tp() -> None:
    with pytest.raises(ProfileError, match="unknown profile"):
        step_model("a100-70b")
    with pytest.raises(ProfileError, match="not modelled"):
        step_model("h100-8b", 3)
