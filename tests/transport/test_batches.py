"""Short requests to one server in one turn of the loop travel as one, against a real (simulated)
server: each prompt gets its own samples, as alone; refusals stay each prompt's own; a failed request
is one failure for the breaker; a prompt whose request is cancelled leaves its batch; a server that is not
vLLM gets one prompt a request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from test_requests import client

from mvllm import httpd
from mvllm.jobs import Sample, Sampling
from mvllm_sim.server import SimServer
from mvllmd.transport.batches import BATCH_MAX_PROMPT_CHARS, BATCH_MAX_TOKENS, BATCH_MOST, Batches
from mvllmd.transport.requests import RequestFailed, send
from mvllmd.transport.streams import Stream

from simkit import StartSim

SHORT = Sampling(max_tokens=8)


def requests_seen(server: SimServer) -> int:
    """HTTP requests the simulator was sent (what its --hang-after-requests counts)."""
    return server.faults.requests_seen


async def together(
    batches: Batches, url: str, prompts: Sequence[str], n: int = 1
) -> list[list[Sample] | BaseException]:
    """Send each prompt (prompt index = its place) in the same turn of the loop, as the dispatcher does."""
    sends = [batches.send(url, p, i, list(range(n)), 30.0) for i, p in enumerate(prompts)]
    return await asyncio.gather(*sends, return_exceptions=True)


async def test_requests_sent_in_one_turn_travel_as_one(start_sim: StartSim) -> None:
    url, server = await start_sim("--time-scale", "0")
    prompts = [f"Question {i}: " + "why " * i for i in range(10)]
    with client() as http:
        batches = Batches(http, "sim", SHORT)
        got = await together(batches, url, prompts, n=3)
        assert requests_seen(server) == 1
        alone = [await send(http, url, "sim", SHORT, p, i, [0, 1, 2]) for i, p in enumerate(prompts)]
    for i, (samples, reference) in enumerate(zip(got, alone, strict=True)):
        assert isinstance(samples, list)
        assert [(s.prompt_index, s.sample_index) for s in samples] == [(i, 0), (i, 1), (i, 2)]
        # The counts a prompt sent alone gets: its own prompt's tokens, not the batch's sum.
        assert [s.prompt_tokens for s in samples] == [r.prompt_tokens for r in reference]
        assert all(s.response and 0 < (s.completion_tokens or 0) <= 8 for s in samples)
        assert all(s.error is None and s.endpoint == url and s.seed is None for s in samples)
        assert all(s.token_ids is None for s in samples)  # asked for, but the job did not want them


async def test_a_batch_holds_at_most_batch_most_prompts(start_sim: StartSim) -> None:
    url, server = await start_sim("--time-scale", "0")
    with client() as http:
        got = await together(Batches(http, "sim", SHORT), url, [f"p{i}" for i in range(BATCH_MOST + 5)])
    assert all(isinstance(s, list) and len(s) == 1 for s in got)
    assert requests_seen(server) == 2


@pytest.mark.parametrize(
    ("sampling", "prompt", "stream"),
    [
        (Sampling(max_tokens=8, seed=3), "seeded", False),  # each prompt has its own seed
        (Sampling(max_tokens=BATCH_MAX_TOKENS + 1), "longer samples", False),
        (Sampling(max_tokens=None), "no max_tokens", False),
        (SHORT, [{"role": "user", "content": "a chat"}], False),  # one conversation a request
        (SHORT, "x" * (BATCH_MAX_PROMPT_CHARS + 1), False),  # its ids would come back
        (Sampling(max_tokens=8), "streamed", True),
    ],
    ids=["seeded", "long-samples", "no-max-tokens", "chat", "long-prompt", "streamed"],
)
async def test_what_never_shares_a_request(
    start_sim: StartSim, sampling: Sampling, prompt: str | list[dict[str, str]], stream: bool
) -> None:
    url, server = await start_sim("--time-scale", "0")
    with client() as http:
        batches = Batches(http, "sim", sampling)
        sends = [batches.send(url, prompt, i, [0], 30.0, stream=Stream(1) if stream else None) for i in range(4)]
        got = await asyncio.gather(*sends)
    assert [s[0].prompt_index for s in got] == [0, 1, 2, 3]
    assert requests_seen(server) == 4


async def test_a_prompt_refused_alone_refuses_only_itself(start_sim: StartSim) -> None:
    url, server = await start_sim("--time-scale", "0", "--max-model-len", "64")
    prompts = ["short one", "word " * 200, "short two", "short three"]
    with client() as http:
        got = await together(Batches(http, "sim", SHORT), url, prompts)
    refused = got[1]
    assert isinstance(refused, RequestFailed) and not refused.retryable
    assert "HTTP 400" in str(refused) and "64" in str(refused)  # the server's own words: its limit
    assert all(isinstance(got[i], list) and got[i][0].prompt_index == i for i in (0, 2, 3))  # type: ignore[index]
    assert requests_seen(server) == 1 + len(prompts)  # the batch, then each prompt alone


async def test_a_failed_request_is_one_failure_of_the_server(start_sim: StartSim) -> None:
    url, _ = await start_sim("--time-scale", "0", "--error-rate", "1", "--error-status", "503")
    with client() as http:
        got = await together(Batches(http, "sim", SHORT), url, [f"p{i}" for i in range(6)])
    assert all(isinstance(e, RequestFailed) and e.retryable and "HTTP 503" in str(e) for e in got)
    assert sum(e.counted for e in got if isinstance(e, RequestFailed)) == 1  # the breaker hears of it once


async def running(url: str) -> float:
    async with httpx.AsyncClient() as session:
        text = (await session.get(f"{url}/metrics")).text
    line = next(x for x in text.splitlines() if x.startswith("vllm:num_requests_running"))
    return float(line.rsplit(" ", 1)[1])


async def until_running(url: str, count: int, within_s: float) -> None:
    """Wait until the server runs `count` sequences (its /metrics), failing after `within_s`."""
    for _ in range(int(within_s / 0.05)):
        if await running(url) == count:
            return
        await asyncio.sleep(0.05)
    assert await running(url) == count


LONG = ("--output-len-mu", "7", "--output-len-sigma", "0")  # every sample runs to its max_tokens


async def test_a_cancelled_prompt_leaves_its_batch(start_sim: StartSim) -> None:
    url, server = await start_sim("--time-scale", "5", *LONG)
    # 40 tokens take about 14 s there: anything it stops sooner was cancelled.
    slow, _ = await start_sim("--time-scale", "50", *LONG)
    with client() as http:
        batches = Batches(http, "sim", Sampling(max_tokens=40))
        tasks = [asyncio.create_task(batches.send(url, f"p{i}", i, [0], 30.0)) for i in range(3)]
        await until_running(url, 3, within_s=10)
        assert requests_seen(server) == 1
        tasks[1].cancel()  # (a hung server's requests sent elsewhere, a copy that lost)
        first, third = await tasks[0], await tasks[2]
        assert first[0].prompt_index == 0 and third[0].prompt_index == 2 and first[0].completion_tokens == 40
        # When every prompt of a batch has left, the request is cancelled: the server stops its work.
        tasks = [asyncio.create_task(batches.send(slow, f"q{i}", i, [0], 60.0)) for i in range(3)]
        await until_running(slow, 3, within_s=10)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await until_running(slow, 0, within_s=5)
        # Closed (the job's dispatcher ends) with a batch on its way: its prompts' requests are cancelled,
        # none is left waiting.
        tasks = [asyncio.create_task(batches.send(slow, f"r{i}", i, [0], 60.0)) for i in range(2)]
        await until_running(slow, 2, within_s=10)
        batches.close()
        ended = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        assert all(isinstance(e, asyncio.CancelledError) for e in ended)


class NotVllm:
    """An OpenAI-compatible server that is not vLLM (a real HTTP server on a real socket): it refuses a
    list of prompts (`lists="refuse"`), or answers one without token ids (`lists="no-ids"`)."""

    def __init__(self, lists: str) -> None:
        self.lists = lists
        self.requests: list[Any] = []  # the prompt of each request it was sent
        self.server = httpd.Server({("POST", "/v1/completions"): self._complete})

    async def _complete(self, request: httpd.Request) -> httpd.Response:
        prompt = json.loads(request.body)["prompt"]
        self.requests.append(prompt)
        if isinstance(prompt, list) and self.lists == "refuse":
            return httpd.json_response({"error": {"message": "prompt must be a string", "code": 400}}, 400)
        prompts = prompt if isinstance(prompt, list) else [prompt]
        choices = [{"index": i, "text": f"answer to {p}", "finish_reason": "length"} for i, p in enumerate(prompts)]
        return httpd.json_response({"choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": 2}})


@pytest.mark.parametrize("lists", ["refuse", "no-ids"])
async def test_a_server_that_takes_no_batches_gets_one_prompt_a_request(lists: str) -> None:
    fake = NotVllm(lists)
    host, port = await fake.server.start("127.0.0.1", 0)
    url = f"http://{host}:{port}"
    try:
        with client() as http:
            batches = Batches(http, "m", SHORT)
            for turn in range(2):
                got = await together(batches, url, [f"t{turn}p{i}" for i in range(4)])
                assert [s[0].response for s in got] == [f"answer to t{turn}p{i}" for i in range(4)]  # type: ignore[index]
                assert all(s[0].prompt_tokens == 3 and s[0].completion_tokens == 2 for s in got)  # type: ignore[index]
    finally:
        await fake.server.close()
    # The first turn's batch, then its prompts alone; the second turn's alone at once.
    assert [isinstance(p, list) for p in fake.requests] == [True] + [False] * 8
