"""Requests to a real (simulated) OpenAI server: bodies, samples, seeds, and which failures retry."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from mvllm.jobs import Sampling
from mvllm_sim.text import token_ids
from mvllmd.transport.http import Client
from mvllmd.transport.requests import RequestFailed, build_body, derive_seed, sample_seed, send
from mvllmd.transport.streams import Prefix, Stream

from simkit import StartSim


@contextlib.contextmanager
def client() -> Iterator[Client]:
    http = Client()
    try:
        yield http
    finally:
        http.close()


def test_seeds_derive_from_the_indexes() -> None:
    s = Sampling(seed=7)
    assert sample_seed(s, 3, 0) == derive_seed(7, 3)  # what an n=k request for all of them sends
    assert sample_seed(s, 3, 2) == derive_seed(7, 3) + 2  # vLLM's seed of choice 2 of that request
    assert sample_seed(s, 4, 0) != sample_seed(s, 3, 0)
    assert sample_seed(Sampling(), 3, 1) is None  # no --seed: none is sent
    assert 0 <= derive_seed(2**62, 10**9) < 2**31


def test_bodies() -> None:
    s = Sampling(max_tokens=8, stop=("\n",), logprobs=2, extra_body={"top_k": 5, "model": "ignored"})
    text = build_body("m", s, "hi", n=2, seed=None)
    assert text["prompt"] == "hi" and text["n"] == 2 and text["model"] == "m" and text["top_k"] == 5
    assert text["logprobs"] == 2 and "seed" not in text and text["stop"] == ["\n"]
    chat = build_body("m", s, [{"role": "user", "content": "hi"}], n=1, seed=11)
    assert chat["messages"][0]["content"] == "hi" and chat["seed"] == 11
    assert chat["logprobs"] is True and chat["top_logprobs"] == 2
    # Token ids are asked for when n > 1 (the exact count of each choice) or when the job wants them.
    assert text["return_token_ids"] is True and "return_token_ids" not in chat
    assert build_body("m", Sampling(return_token_ids=True), "hi", n=1, seed=None)["return_token_ids"] is True


async def test_samples_from_completions_and_chat(start_sim: StartSim) -> None:
    base, _ = await start_sim("--time-scale", "0")
    sampling = Sampling(max_tokens=6, seed=1, return_token_ids=True)
    with client() as session:
        texts = await send(session, base, "sim", sampling, "Once upon a time", 4, [0, 1, 2])
        chats = await send(session, base, "sim", sampling, [{"role": "user", "content": "hi"}], 5, [3])
    assert [(s.prompt_index, s.sample_index) for s in texts] == [(4, 0), (4, 1), (4, 2)]
    assert all(s.response and s.error is None and s.endpoint == base for s in texts)
    assert all(s.completion_tokens == len(s.token_ids or []) for s in texts)  # exact per choice, n = 3
    assert [t.seed for t in texts] == [derive_seed(1, 4) + i for i in range(3)]
    assert chats[0].sample_index == 3 and chats[0].seed == derive_seed(1, 5) + 3
    assert chats[0].prompt_tokens and chats[0].latency_s is not None
    with client() as session:
        (alone,) = await send(session, base, "sim", Sampling(max_tokens=6), "Once upon a time", 0, [0])
    assert alone.token_ids is None and alone.completion_tokens == len(alone.response.split())  # from the usage


async def test_a_seeded_sample_is_the_same_in_any_request(start_sim: StartSim) -> None:
    """A sample's output depends on its own seed only: asked with its siblings in one n=k request, or
    alone, or in a run starting elsewhere, it is the same sample (vLLM's rule, which the simulator follows)."""
    base, _ = await start_sim("--time-scale", "0")
    sampling = Sampling(max_tokens=30, seed=9)
    with client() as session:
        together = await send(session, base, "sim", sampling, "Tell me a story", 0, [0, 1, 2, 3])
        alone = [await send(session, base, "sim", sampling, "Tell me a story", 0, [i]) for i in range(4)]
        run = await send(session, base, "sim", sampling, "Tell me a story", 0, [2, 3])
        with pytest.raises(ValueError, match="contiguous run"):
            await send(session, base, "sim", sampling, "Tell me a story", 0, [0, 2])
    assert [s.response for s in together] == [a[0].response for a in alone]
    assert [s.response for s in run] == [s.response for s in together[2:]]
    assert len({s.response for s in together}) == 4  # and the samples of a prompt differ


async def test_failures_say_whether_to_retry(start_sim: StartSim) -> None:
    base, _ = await start_sim("--time-scale", "0", "--max-model-len", "64")
    with client() as session:
        with pytest.raises(RequestFailed) as too_long:
            await send(session, base, "sim", Sampling(max_tokens=100), "x", 0, [0])
        assert not too_long.value.retryable and "HTTP 400: max_tokens=100 cannot be greater" in str(too_long.value)
        with pytest.raises(RequestFailed) as unknown:
            await send(session, base, "other", Sampling(), "x", 0, [0])
        assert not unknown.value.retryable and "HTTP 404" in str(unknown.value)
        with pytest.raises(RequestFailed) as refused:
            await send(session, "http://127.0.0.1:9", "sim", Sampling(), "x", 0, [0])
        assert refused.value.retryable


async def test_server_errors_are_retryable(start_sim: StartSim) -> None:
    base, _ = await start_sim("--time-scale", "0", "--error-rate", "1", "--error-status", "503")
    with client() as session, pytest.raises(RequestFailed) as unavailable:
        await send(session, base, "sim", Sampling(), "x", 0, [0])
    assert unavailable.value.retryable and "HTTP 503" in str(unavailable.value)


async def test_a_streamed_answer_gives_the_samples_of_a_plain_one(start_sim: StartSim) -> None:
    """Seeded, so that both requests ask for the same samples: streamed (a chunk per 64 tokens), a
    request's samples are what the plain request gives, and the stream shows what each choice made."""
    base, _ = await start_sim("--time-scale", "0")
    sampling = Sampling(max_tokens=300, seed=3, logprobs=1, return_token_ids=True)
    for prompt in ("Tell me a story", [{"role": "user", "content": "hi"}]):
        with client() as session:
            plain = await send(session, base, "sim", sampling, prompt, 2, [0, 1, 2])
            stream = Stream(3)
            streamed = await send(session, base, "sim", sampling, prompt, 2, [0, 1, 2], stream=stream)
        fields = ("response", "finish_reason", "prompt_tokens", "completion_tokens", "token_ids", "logprobs", "seed")
        assert [[getattr(s, f) for f in fields] for s in streamed] == [[getattr(s, f) for f in fields] for s in plain]
        assert stream.done and stream.prompt_token_ids and not stream.unfinished()
        assert [len(c.text) for c in stream.choices] == [2 + (s.completion_tokens - 2) // 64 for s in plain]


async def test_a_continued_sample_is_one_sample(start_sim: StartSim) -> None:
    """A sample continued from a prefix: the server gets the prompt's and the prefix's token ids and
    the tokens left; the Sample joins both parts."""
    base, _ = await start_sim("--time-scale", "0")
    sampling = Sampling(max_tokens=2000, return_token_ids=True)
    with client() as session:
        stream = Stream(1)
        fifty = Sampling(max_tokens=50, return_token_ids=True, extra_body={"ignore_eos": True})
        (first,) = await send(session, base, "sim", fifty, "Tell me a story", 0, [0], stream=stream)
        prefix = stream.prefix(0, started=0.0, earlier=None)
        assert prefix is not None and len(prefix.token_ids) == 50
        (joined,) = await send(session, base, "sim", sampling, "ignored: the prefix holds it", 0, [0], prefix=prefix)
    assert joined.response is not None and joined.response.startswith(first.response + " ")
    assert joined.completion_tokens == len(joined.response.split()) == len(joined.token_ids or []) > 50
    assert joined.token_ids == token_ids(joined.response) and joined.prompt_tokens == first.prompt_tokens
    assert joined.finish_reason in {"stop", "length"} and joined.latency_s is not None and joined.latency_s > 0
    with client() as session, pytest.raises(RequestFailed) as too_long:
        await send(session, base, "sim", Sampling(max_tokens=50 + 200_000), "x", 0, [0],
                   prefix=Prefix(prefix.prompt_token_ids, prefix.token_ids, "", (), 1, 0.0))  # fmt: skip
    assert "HTTP 400" in str(too_long.value) and not too_long.value.retryable
