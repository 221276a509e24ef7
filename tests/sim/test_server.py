"""vLLM's OpenAI API as the simulator serves it: formats, streaming, determinism, errors, /metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI, NotFoundError

from mvllm_sim.text import pieces

from simkit import StartSim, completion_body


async def post(http: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, Any]:
    async with http.post(url, json=body, **kw) as response:
        return response.status, await response.json()


async def sse(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    events = []
    async with http.post(url, json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def metric(http: aiohttp.ClientSession, base: str, name: str) -> float:
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_health_models_version(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0", "--served-model-name", "sim")
    async with http.get(f"{base}/health") as r:
        assert r.status == 200
    async with http.get(f"{base}/v1/models") as r:
        models = await r.json()
    assert [m["id"] for m in models["data"]] == ["sim"]
    assert models["data"][0]["max_model_len"] == 131072
    async with http.get(f"{base}/version") as r:
        assert (await r.json())["version"] == "0.32.0"


async def test_completion_shape_and_determinism(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0")
    url = f"{base}/v1/completions"
    status, first = await post(http, url, completion_body(n=3))
    assert status == 200
    assert first["object"] == "text_completion" and first["model"] == "sim"
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert len(set(texts)) == 3  # each choice is its own sample
    assert first["usage"]["prompt_tokens"] == len(pieces("The quick brown fox"))
    assert first["usage"]["completion_tokens"] == sum(len(t.split()) for t in texts)
    _, again = await post(http, url, completion_body(n=3))
    assert not set(c["text"] for c in again["choices"]) & set(texts)  # unseeded, each request draws anew
    fresh, _ = await start_sim("--time-scale", "0")
    _, replayed = await post(http, f"{fresh}/v1/completions", completion_body(n=3))
    assert [c["text"] for c in replayed["choices"]] == texts  # the same requests in the same order: the same
    _, seeded = await post(http, url, completion_body(n=3, seed=7))
    assert [c["text"] for c in seeded["choices"]] != texts
    _, seeded_again = await post(http, url, completion_body(n=3, seed=7))
    assert seeded_again["choices"] == seeded["choices"]


async def test_lengths_stop_and_ignore_eos(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0", "--output-len-mu", "2.0", "--output-len-sigma", "0.5")
    url = f"{base}/v1/completions"
    _, capped = await post(http, url, completion_body(max_tokens=64, n=8))
    lengths = [len(c["text"].split()) for c in capped["choices"]]
    assert all(1 <= n < 64 for n in lengths) and len(set(lengths)) > 1  # log-normal around e^2 ~ 7
    assert {c["finish_reason"] for c in capped["choices"]} == {"stop"}
    _, forced = await post(http, url, completion_body(max_tokens=64, ignore_eos=True, seed=3))
    assert len(forced["choices"][0]["text"].split()) == 64
    assert forced["choices"][0]["finish_reason"] == "length"
    word = forced["choices"][0]["text"].split()[10]
    _, stopped = await post(http, url, completion_body(max_tokens=64, ignore_eos=True, stop=[word], seed=3))
    assert word not in stopped["choices"][0]["text"]
    assert stopped["choices"][0]["finish_reason"] == "stop"


async def test_logprobs_and_token_ids(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0")
    _, body = await post(http, f"{base}/v1/completions", completion_body(logprobs=2, return_token_ids=True))
    choice = body["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == len(choice["token_ids"]) == body["usage"]["completion_tokens"]
    assert all(lp <= 0 for lp in choice["logprobs"]["token_logprobs"])
    assert choice["prompt_token_ids"] and len(choice["prompt_token_ids"]) == body["usage"]["prompt_tokens"]


async def test_chat_completion(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    status, body = await post(http, f"{base}/v1/chat/completions", {"model": "sim", "messages": messages, "n": 2})
    assert status == 200
    assert body["object"] == "chat.completion"
    assert [c["message"]["role"] for c in body["choices"]] == ["assistant", "assistant"]
    # 2 + role + content tokens per message, 2 for the assistant's turn (see mvllm_sim.text).
    assert body["usage"]["prompt_tokens"] == (2 + 1 + 3) + (2 + 1 + 3) + 2


async def test_streaming_matches_the_plain_answer(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0.002")
    body = completion_body(n=2, max_tokens=40, ignore_eos=True, seed=5)  # seeded: both requests, one answer
    _, plain = await post(http, f"{base}/v1/completions", body)
    events = await sse(
        http, f"{base}/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert events[-1] == "[DONE]"
    usage_event = events[-2]
    assert usage_event["choices"] == [] and usage_event["usage"] == plain["usage"]
    chunks = events[:-2]
    assert len(chunks) > 2  # it streamed, not one lump
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == plain["choices"][index]["text"]
        assert [c["finish_reason"] for c in mine][-1] == "length"


async def test_chat_streaming(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0")
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True,
            "seed": 5}  # fmt: skip
    _, plain = await post(http, f"{base}/v1/chat/completions", body)
    events = await sse(http, f"{base}/v1/chat/completions", {**body, "stream": True})
    chunks = events[:-1]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]


async def test_openai_client(start_sim: StartSim) -> None:
    base, _ = await start_sim("--time-scale", "0")
    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    async with client:
        completion = await client.completions.create(model="sim", prompt="Once upon a time", max_tokens=8, n=2, seed=4)
        assert len(completion.choices) == 2 and completion.usage is not None
        chat = await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=6, seed=2
        )
        assert chat.choices[0].message.content
        streamed = ""
        stream = await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True, seed=2
        )
        async for chunk in stream:
            if chunk.choices:
                streamed += chunk.choices[0].delta.content or ""
        assert streamed == chat.choices[0].message.content
        text = ""
        async for part in await client.completions.create(
            model="sim", prompt="Once upon a time", max_tokens=8, stream=True, seed=4
        ):
            text += part.choices[0].text
        assert text == completion.choices[0].text
        with pytest.raises(NotFoundError):
            await client.completions.create(model="other", prompt="x", max_tokens=1)


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("completions", {"model": "nope", "prompt": "x"}, 404, "The model `nope` does not exist. Valid aliases: sim."),
        ("completions", {"model": "sim"}, 400, "prompt"),
        ("chat/completions", {"model": "sim"}, 400, "messages"),
        ("completions", {"model": "sim", "prompt": "x", "n": 0}, 400, "n must be at least 1, got 0."),
        (
            "completions",
            {"model": "sim", "prompt": "x", "max_tokens": 10**6},
            400,
            "cannot be greater than max_model_len",
        ),
        (
            "completions",
            {"model": "sim", "prompt": "x y z", "max_tokens": 131071},
            400,
            "maximum context length is 131072",
        ),
        ("completions", {"model": "sim", "prompt": "x", "temperature": "hot"}, 400, "temperature must be a number"),
        ("completions", ["not", "an", "object"], 400, "JSON object"),
    ],
)
async def test_bad_requests(
    start_sim: StartSim, http: aiohttp.ClientSession, path: str, body: Any, status: int, fragment: str
) -> None:
    base, _ = await start_sim("--time-scale", "0")
    got, answer = await post(http, f"{base}/v1/{path}", body)
    assert got == status
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["code"] == status
    assert fragment in answer["error"]["message"]
    assert (await post(http, f"{base}/v1/completions", completion_body()))[0] == 200  # still serving


async def test_malformed_json(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0")
    async with http.post(
        f"{base}/v1/completions", data=b'{"model": "sim", "prompt": ', headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["type"] == "Bad Request"  # what vLLM 0.32 answers (measured)
    assert (await post(http, f"{base}/v1/completions", completion_body()))[0] == 200


async def test_api_key(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0", "--api-key", "s3cret")
    assert (await post(http, f"{base}/v1/completions", completion_body()))[0] == 401
    headers = {"Authorization": "Bearer s3cret"}
    assert (await post(http, f"{base}/v1/completions", completion_body(), headers=headers))[0] == 200
    async with http.get(f"{base}/health") as r:
        assert r.status == 200  # health needs no key, as in vLLM


async def test_metrics_follow_what_was_served(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, server = await start_sim("--time-scale", "0")
    served = 0
    for n in (1, 2, 3):
        _, body = await post(http, f"{base}/v1/completions", completion_body(n=n))
        served += body["usage"]["completion_tokens"]
    assert await metric(http, base, "vllm:generation_tokens_total") == served
    assert await metric(http, base, "vllm:prompt_tokens_total") == 3 * len(pieces("The quick brown fox"))
    assert await metric(http, base, "vllm:num_requests_running") == 0
    assert await metric(http, base, "vllm:num_requests_waiting") == 0
    assert await metric(http, base, "vllm:e2e_request_latency_seconds_count") == 3
    assert await metric(http, base, "mvllm_sim:clock_seconds") == server.engine.now


async def test_the_queue_time_is_what_a_request_waited_for_the_batch(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    base, server = await start_sim("--time-scale", "0", "--max-num-seqs", "1")
    first, second = await asyncio.gather(
        post(http, f"{base}/v1/completions", completion_body(max_tokens=40, ignore_eos=True)),
        post(http, f"{base}/v1/completions", completion_body(max_tokens=40, ignore_eos=True)),
    )
    assert first[0] == second[0] == 200
    assert await metric(http, base, "vllm:request_queue_time_seconds_count") == 2
    waited = await metric(http, base, "vllm:request_queue_time_seconds_sum")
    # One ran at once; the other waited for all of it: half of the simulated time (both are alike).
    assert waited > 0
    assert waited == pytest.approx(server.engine.now / 2, rel=0.05)


async def test_metrics_escape_odd_model_names(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0", "--served-model-name", 'we"ird\\name\nx')
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    assert 'model_name="we\\"ird\\\\name\\nx"' in text
    for line in text.splitlines():  # a raw newline in a label would break a sample line in two
        assert line.startswith(("#", "vllm:", "mvllm_sim:")), line
        assert line.startswith("#") or float(line.rsplit(" ", 1)[1]) >= 0


async def test_stream_interval_and_token_ids(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    """vLLM's per-request stream_interval: the first token at once, then chunks of the interval, the
    last whatever is left; with return_token_ids each chunk carries its tokens' ids, the first the prompt's."""
    base, _ = await start_sim("--time-scale", "0")
    body = completion_body(n=2, max_tokens=50, ignore_eos=True, seed=5, return_token_ids=True)
    _, plain = await post(http, f"{base}/v1/completions", body)
    events = await sse(http, f"{base}/v1/completions", {**body, "stream": True, "stream_interval": 16})
    for index in (0, 1):
        mine = [c["choices"][0] for c in events[:-1] if c["choices"][0]["index"] == index]
        assert [len(c["token_ids"]) for c in mine] == [1, 16, 16, 16, 1]
        assert [c["finish_reason"] for c in mine] == [None] * 4 + ["length"]
        assert mine[0]["prompt_token_ids"] == plain["choices"][index]["prompt_token_ids"]
        assert all(c["prompt_token_ids"] is None for c in mine[1:])
        assert [t for c in mine for t in c["token_ids"]] == plain["choices"][index]["token_ids"]
    chat = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "ignore_eos": True,
            "return_token_ids": True, "stream": True, "stream_interval": 4}  # fmt: skip
    events = await sse(http, f"{base}/v1/chat/completions", chat)
    assert [len(c["choices"][0]["token_ids"]) for c in events[:-1]] == [1, 4, 4]
    assert events[0]["prompt_token_ids"] and "prompt_token_ids" not in events[1]
    status, error = await post(http, f"{base}/v1/completions", {**body, "stream_interval": 0})
    assert status == 400 and "stream_interval must be at least 1" in error["error"]["message"]


async def test_a_continued_answer_has_the_length_of_one_answer(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    """A prompt ending with p tokens of the simulator's own output continues that answer: the rest it
    draws is the log-normal conditioned on exceeding p, so answers made in two requests (the first
    cut at 100 tokens) have the lengths of answers made in one. 400 answers each way, medians compared."""
    base, _ = await start_sim("--time-scale", "0")
    prompt = "Tell me something."
    whole, joined = [], []
    for _ in range(400):
        _, one = await post(http, f"{base}/v1/completions", completion_body(prompt=prompt, max_tokens=4000))
        whole.append(one["usage"]["completion_tokens"])
        _, first = await post(http, f"{base}/v1/completions",
                              completion_body(prompt=prompt, max_tokens=100, return_token_ids=True))  # fmt: skip
        choice = first["choices"][0]
        if choice["finish_reason"] == "stop":
            joined.append(len(choice["token_ids"]))
            continue
        ids = [*choice["prompt_token_ids"], *choice["token_ids"]]
        _, rest = await post(http, f"{base}/v1/completions", completion_body(prompt=ids, max_tokens=4000 - 100))
        joined.append(100 + rest["usage"]["completion_tokens"])
    whole.sort()
    joined.sort()
    # The simulator's median is exp(5.3) = 200 tokens; a fresh draw after 100 would give about 100 + 200.
    assert 170 < whole[200] < 235 and 170 < joined[200] < 235
    assert abs(whole[100] - joined[100]) < 25 and abs(whole[300] - joined[300]) < 60  # the quartiles
    assert sum(1 for n in joined if n > 100) > 250


async def test_detokenize(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0")
    _, answer = await post(http, f"{base}/v1/completions", completion_body(max_tokens=5, return_token_ids=True))
    ids = answer["choices"][0]["token_ids"]
    status, said = await post(http, f"{base}/detokenize", {"model": "sim", "tokens": ids})
    assert status == 200 and said["prompt"] == answer["choices"][0]["text"]
    assert (await post(http, f"{base}/detokenize", {"tokens": [7]}))[1]["prompt"] == "<7>"  # not one of its words
    status, error = await post(http, f"{base}/detokenize", {"tokens": "x"})
    assert status == 400 and "tokens" in error["error"]["message"]
