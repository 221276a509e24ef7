"""vLLM's development routes as the simulator serves them (VLLM_SERVER_DEV_MODE=1): pause and resume
in each mode, sleep and wake up, weights reload and version, prefix cache reset; and weights that a
client can tell apart token by token (mvllm_sim.weights)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mvllm_sim.cli import config_from, parser
from mvllm_sim.text import WORDS, answer_so_far, token_ids, weights_tag, with_tag
from mvllm_sim.weights import DISCARDED_TAG, Provenance, fingerprint, make_checkpoint, weights_tag_of

from simkit import StartSim, completion_body

# What the simulator answered before weights existed (computed from that code): without a checkpoint,
# its output must stay exactly this.
UNTAGGED = [
    ["fiwer sugo kakar rujan fipe huzir hupes pekan"],
    ["pevor jatan zigon huzis hulo wetar kadas sugon", "lozis nerun lovon jasus wezir huner lotar vomin"],
    [" pelo jatar wedan nedan kadan mizis zimin govon"],
]


@pytest.fixture
def dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")


async def post(http: aiohttp.ClientSession, url: str, body: Any = None) -> tuple[int, Any]:
    async with http.post(url, json=body) as response:
        return response.status, await response.json()


async def get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200
        return await response.json()


async def metric(http: aiohttp.ClientSession, base: str, name: str, label: str = "") -> float:
    """The value of the first sample of metric `name` whose labels hold `label`."""
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(name + "{") and label in line)  # fmt: skip


def body(**extra: Any) -> dict[str, Any]:
    """A completion for whatever model the server serves (the checkpoint's path, in most tests)."""
    return {"prompt": "The quick brown fox", "ignore_eos": True, **extra}


class Streamed:
    """A streamed completion, read in the background: its words and events as they arrive."""

    def __init__(self, http: aiohttp.ClientSession, base: str, request: dict[str, Any]) -> None:
        self.words: list[str] = []
        self.events: list[Any] = []
        self.task = asyncio.create_task(self._read(http, f"{base}/v1/completions", {**request, "stream": True}))

    async def _read(self, http: aiohttp.ClientSession, url: str, request: dict[str, Any]) -> None:
        async with http.post(url, json=request) as response:
            assert response.status == 200
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    data = line.removeprefix("data: ")
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                    if data != "[DONE]":
                        self.words += self.events[-1]["choices"][0]["text"].split()

    @property
    def finish(self) -> str | None:
        return self.events[-2]["choices"][0]["finish_reason"] if self.events[-1] == "[DONE]" else None

    async def until(self, words: int) -> None:
        async with asyncio.timeout(10):
            while len(self.words) < words:
                await asyncio.sleep(0.002)


# --- the weights' tags ------------------------------------------------------------------------------


def test_a_checkpoint_of_a_given_tag_and_its_content_fingerprint(tmp_path: Path) -> None:
    tags = {make_checkpoint(tmp_path / f"c{t}", t): t for t in (0, 7, 14)}
    for path, tag in tags.items():
        assert weights_tag_of(fingerprint(path)) == tag
    copy = Path(shutil.copytree(tmp_path / "c7", tmp_path / "copy"))
    assert fingerprint(copy) == fingerprint(tmp_path / "c7")  # names and contents, not where or when
    blob = copy / "weights.bin"
    blob.write_bytes(bytes([blob.read_bytes()[0] ^ 1]) + blob.read_bytes()[1:])  # same size, same mtime order
    assert fingerprint(copy) != fingerprint(tmp_path / "c7")
    (copy / "weights.bin").rename(copy / "other.bin")
    assert fingerprint(copy) != fingerprint(tmp_path / "c7")
    with pytest.raises(ValueError, match="0-14"):
        make_checkpoint(tmp_path / "x", DISCARDED_TAG)


def test_a_word_carries_its_tag_and_continuations_read_words_of_any_tag() -> None:
    assert {weights_tag(with_tag(w, t)) for w in WORDS[:64] for t in (5,)} == {5}
    assert sorted({weights_tag(w) for w in WORDS}) == list(range(16))
    assert with_tag(with_tag("kalo", 9), weights_tag("kalo")) == "kalo"  # the tag replaces low bits only
    tagged = [with_tag(w, 12) for w in ("kalo", "mines", "rujan")]
    assert answer_so_far(token_ids("Go on: " + " ".join(tagged))) == 3


def test_provenance_switches_tags_from_a_token_on() -> None:
    words = tuple(with_tag(w, 2) for w in WORDS[:10])
    choice = Provenance([(0, 2)])
    assert choice.words(words) == list(words)
    choice.switch(4, 6)
    choice.switch(7, None)  # no fingerprint: words as generated
    assert [weights_tag(w) for w in choice.words(words)] == [2] * 4 + [6] * 3 + [2] * 3
    assert choice.words(words, 3, 5) == [words[3], with_tag(words[4], 6)]


# --- dev mode, and output without a checkpoint -------------------------------------------------------


def test_dev_mode_and_reload_time_from_the_environment_and_flags() -> None:
    args = parser().parse_args(["--model", "sim"])
    assert not config_from(args, {}).dev_mode
    assert not config_from(args, {"VLLM_SERVER_DEV_MODE": "0"}).dev_mode
    assert config_from(args, {"VLLM_SERVER_DEV_MODE": "1"}).dev_mode  # vLLM: bool(int(value))
    with pytest.raises(ValueError, match="VLLM_SERVER_DEV_MODE must be an integer"):
        config_from(args, {"VLLM_SERVER_DEV_MODE": "yes"})  # vLLM fails to start on it too
    assert config_from(args, {}).reload_s == 3.2  # the h100-8b profile's
    assert config_from(parser().parse_args(["--reload-s", "0.05"]), {}).reload_s == 0.05
    assert config_from(args, {}).fingerprint is None  # ./sim is a directory, not a checkpoint


async def test_the_routes_exist_in_dev_mode_only_and_need_no_key(
    start_sim: StartSim, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, _ = await start_sim("--time-scale", "0")
    for path in ("/pause", "/resume", "/sleep", "/wake_up", "/collective_rpc", "/reset_prefix_cache"):
        async with http.post(f"{plain}{path}") as r:
            assert r.status == 404
    async with http.get(f"{plain}/is_paused") as r:
        assert r.status == 404
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    dev, _ = await start_sim("--time-scale", "0", "--api-key", "k")
    assert await get(http, f"{dev}/is_paused") == {"is_paused": False}  # vLLM's key guards /v1 only
    assert await post(http, f"{dev}/pause") == (200, {"status": "paused"})
    assert (await post(http, f"{dev}/v1/completions", completion_body()))[0] == 401


@pytest.mark.parametrize("dev", [False, True])
async def test_without_a_checkpoint_the_output_is_as_before(
    start_sim: StartSim, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, dev: bool
) -> None:
    if dev:
        monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    base, _ = await start_sim("--time-scale", "0")  # --model sim: a name (./sim is a directory, no checkpoint)
    got = []
    for extra in ({}, {"n": 2, "seed": 11}, {"prompt": "Go on: kalo mines", "seed": 3}):
        _, answer = await post(http, f"{base}/v1/completions", completion_body(max_tokens=8, **extra))
        got.append([c["text"] for c in answer["choices"]])
    assert got == UNTAGGED


# --- pause and resume -------------------------------------------------------------------------------


@pytest.mark.usefixtures("dev_mode")
async def test_keep_freezes_a_stream_and_tokens_after_a_reload_carry_the_new_tag(
    start_sim: StartSim, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Under keep no token is made while paused, and every token made before the pause was written
    before /pause answered (whatever the stream interval): what the client read by then is exactly
    what the old weights made."""
    old, new = make_checkpoint(tmp_path / "old", 3), make_checkpoint(tmp_path / "new", 11)
    base, _ = await start_sim("--model", str(old), "--time-scale", "1", "--reload-s", "0.05")
    stream = Streamed(http, base, body(max_tokens=120, stream_interval=50))
    await stream.until(1)  # the first token goes at once; the next 50 wait for each other
    await asyncio.sleep(0.1)  # some 15 tokens are made, not sent
    assert await post(http, f"{base}/pause?mode=keep") == (200, {"status": "paused"})
    await asyncio.sleep(0.2)
    before = len(stream.words)
    assert await get(http, f"{base}/is_paused") == {"is_paused": True}
    assert await metric(http, base, "vllm:num_requests_running") == 1  # frozen, still running
    await asyncio.sleep(0.2)
    assert len(stream.words) == before  # nothing made while paused
    reload = {"method": "reload_weights", "kwargs": {"weights_path": str(new)}}
    assert await post(http, f"{base}/collective_rpc", reload) == (200, {"results": [None]})
    assert await post(http, f"{base}/resume") == (200, {"status": "resumed"})
    await asyncio.wait_for(stream.task, 10)
    assert stream.finish == "length" and len(stream.words) == 120  # lengths do not depend on weights
    assert 2 <= before < 51  # the tokens made were flushed at the pause, not held for the interval
    assert [weights_tag(w) for w in stream.words] == [3] * before + [11] * (120 - before)


@pytest.mark.usefixtures("dev_mode")
async def test_wait_lets_running_requests_end_and_a_new_request_waits_for_resume(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    base, server = await start_sim("--time-scale", "1")
    stream = Streamed(http, base, body(max_tokens=60))
    await stream.until(5)
    assert await post(http, f"{base}/pause?mode=wait") == (200, {"status": "paused"})
    assert server.engine.counters.finished_requests == 1  # it ran to its end before the answer
    await asyncio.wait_for(stream.task, 2)
    assert stream.finish == "length" and len(stream.words) == 60
    late = asyncio.create_task(post(http, f"{base}/v1/completions", body(max_tokens=5)))
    await asyncio.sleep(0.2)
    assert not late.done()
    assert await metric(http, base, "vllm:num_requests_waiting") == 0  # no step: vLLM publishes none
    assert await post(http, f"{base}/resume") == (200, {"status": "resumed"})
    status, answer = await asyncio.wait_for(late, 2)
    assert status == 200 and answer["usage"]["completion_tokens"] == 5
    assert await get(http, f"{base}/is_paused") == {"is_paused": False}


@pytest.mark.usefixtures("dev_mode")
async def test_abort_ends_what_is_in_flight_with_finish_reason_abort(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    base, _ = await start_sim("--time-scale", "1", "--max-num-seqs", "2")
    stream = Streamed(http, base, body(max_tokens=100))
    plain = asyncio.create_task(post(http, f"{base}/v1/completions", body(max_tokens=100)))
    queued = Streamed(http, base, body(max_tokens=100))  # no room in the batch: it waits
    await stream.until(5)
    assert await post(http, f"{base}/pause") == (200, {"status": "paused"})  # abort is the default
    await asyncio.wait_for(asyncio.gather(stream.task, queued.task), 2)
    assert stream.finish == "abort" and 5 <= len(stream.words) < 100
    assert stream.events[-2]["choices"][0]["text"] == ""  # vLLM's last chunk: no text, the reason
    assert queued.events == ["[DONE]"]  # aborted before its first token: no chunk at all, as vLLM
    status, answer = await asyncio.wait_for(plain, 2)
    choice = answer["choices"][0]
    assert status == 200 and choice["finish_reason"] == "abort"
    assert 0 < answer["usage"]["completion_tokens"] == len(choice["text"].split()) < 100
    assert await metric(http, base, "vllm:request_success_total", 'finished_reason="abort"') == 3
    assert await post(http, f"{base}/resume") == (200, {"status": "resumed"})
    assert (await post(http, f"{base}/v1/completions", body(max_tokens=3)))[1]["usage"]["completion_tokens"] == 3


@pytest.mark.usefixtures("dev_mode")
async def test_bad_query_parameters_are_refused_as_fastapi_does(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    base, _ = await start_sim("--time-scale", "0")
    for path, param in (("/pause?mode=bogus", "query.mode"), ("/sleep?level=3", "query.level"),
                        ("/pause?clear_cache=maybe", "query.clear_cache")):  # fmt: skip
        status, answer = await post(http, f"{base}{path}")
        assert status == 400 and answer["error"]["type"] == "Bad Request" and answer["error"]["param"] == param
    assert await get(http, f"{base}/is_paused") == {"is_paused": False}


# --- sleep and wake up ------------------------------------------------------------------------------


@pytest.mark.usefixtures("dev_mode")
async def test_sleep_and_wake_up(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0")
    assert await get(http, f"{base}/is_sleeping") == {"is_sleeping": False}
    assert await post(http, f"{base}/sleep?level=1") == (200, {"status": "sleeping", "level": 1})
    assert await get(http, f"{base}/is_sleeping") == {"is_sleeping": True}
    assert await get(http, f"{base}/is_paused") == {"is_paused": True}
    assert await metric(http, base, "vllm:engine_sleep_state", 'sleep_state="awake"') == 0
    late = asyncio.create_task(post(http, f"{base}/v1/completions", completion_body(max_tokens=4)))
    await asyncio.sleep(0.1)
    assert not late.done()  # asleep, nothing runs: it waits
    assert await post(http, f"{base}/wake_up?tags=kv_cache") == (200, {"status": "sleeping", "tags": ["kv_cache"]})
    assert await post(http, f"{base}/wake_up?tags=bogus") == (200, {"status": "sleeping", "tags": ["bogus"]})
    assert not late.done()
    assert await post(http, f"{base}/wake_up") == (200, {"status": "awake", "tags": None})
    assert (await asyncio.wait_for(late, 2))[1]["usage"]["completion_tokens"] == 4
    assert await get(http, f"{base}/is_sleeping") == {"is_sleeping": False}
    assert await metric(http, base, "vllm:engine_sleep_state", 'sleep_state="awake"') == 1
    assert await post(http, f"{base}/sleep?level=0") == (200, {"status": "sleeping", "level": 0})
    assert await get(http, f"{base}/is_sleeping") == {"is_sleeping": True}  # a pause counts, as in vLLM
    assert await post(http, f"{base}/wake_up?tags=scheduling") == (200, {"status": "awake", "tags": ["scheduling"]})
    assert await post(http, f"{base}/pause?mode=keep") == (200, {"status": "paused"})
    assert await post(http, f"{base}/wake_up") == (200, {"status": "awake", "tags": None})  # lifts a pause too
    assert await get(http, f"{base}/is_paused") == {"is_paused": False}


@pytest.mark.usefixtures("dev_mode")
async def test_level_2_discards_the_weights_until_a_reload(
    start_sim: StartSim, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    model = make_checkpoint(tmp_path / "m", 4)
    base, _ = await start_sim("--model", str(model), "--time-scale", "0", "--reload-s", "0")

    async def tags() -> set[int]:
        _, answer = await post(http, f"{base}/v1/completions", body(max_tokens=30))
        return {weights_tag(w) for w in answer["choices"][0]["text"].split()}

    assert await tags() == {4}
    assert await post(http, f"{base}/sleep?level=2") == (200, {"status": "sleeping", "level": 2})
    assert (await post(http, f"{base}/wake_up"))[1]["status"] == "awake"
    assert await tags() == {DISCARDED_TAG}  # garbage weights, as a GPU's after level 2
    assert await post(http, f"{base}/collective_rpc", {"method": "reload_weights"}) == (200, {"results": [None]})
    assert await tags() == {4}  # reloaded from where they came from: --model


# --- weights: reload and version --------------------------------------------------------------------


@pytest.mark.usefixtures("dev_mode")
async def test_weight_version(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "0")
    assert await get(http, f"{base}/weight_info") == {"weight_version": "default"}  # vLLM's until set
    update = await post(http, f"{base}/update_weight_version", {"new_version": "step-7"})
    assert update == (200, {"success": True, "new_version": "step-7"})
    assert await get(http, f"{base}/weight_info") == {"weight_version": "step-7"}
    status, answer = await post(http, f"{base}/update_weight_version", {})
    assert status == 400 and answer["error"]["param"] == "body.new_version"
    assert await get(http, f"{base}/weight_info") == {"weight_version": "step-7"}


@pytest.mark.usefixtures("dev_mode")
async def test_a_reload_takes_simulated_time_and_changes_the_words(
    start_sim: StartSim, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    old, new = make_checkpoint(tmp_path / "old", 1), make_checkpoint(tmp_path / "new", 13)
    base, server = await start_sim("--model", str(old), "--time-scale", "0", "--reload-s", "2.5", "-tp", "2")
    _, first = await post(http, f"{base}/v1/completions", body(max_tokens=20, seed=1))
    start = server.engine.now
    reload = {"method": "reload_weights", "kwargs": {"weights_path": str(new)}}
    assert await post(http, f"{base}/collective_rpc", reload) == (200, {"results": [None, None]})  # a TP worker each
    assert server.engine.now == pytest.approx(start + 2.5)
    _, second = await post(http, f"{base}/v1/completions", body(max_tokens=20, seed=1))
    before, after = first["choices"][0]["text"].split(), second["choices"][0]["text"].split()
    assert {weights_tag(w) for w in before} == {1} and {weights_tag(w) for w in after} == {13}
    assert [with_tag(w, 13) for w in before] == after  # the same draws, other weights


@pytest.mark.usefixtures("dev_mode")
async def test_a_failed_reload_is_vllms_error_and_changes_nothing(
    start_sim: StartSim, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    model = make_checkpoint(tmp_path / "m", 6)
    base, _ = await start_sim("--model", str(model), "--time-scale", "0")
    missing = {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path / "nowhere")}}
    async with http.post(f"{base}/collective_rpc", json=missing) as r:
        answer = await r.json()
        assert r.status == 500 and r.headers["Connection"] == "close"  # uvicorn closes after the exception
    assert answer["error"]["type"] == "InternalServerError" and answer["error"]["code"] == 500
    assert answer["error"]["message"].startswith("Call to collective_rpc method failed: ")
    assert str(tmp_path) not in answer["error"]["message"]  # vLLM's paths read <path>
    assert (await post(http, f"{base}/collective_rpc", {"method": "reload_weights"}))[0] == 500  # it kept the path
    assert (await post(http, f"{base}/collective_rpc", {"method": "frobnicate"}))[0] == 500
    assert await post(http, f"{base}/collective_rpc", {"args": []}) == (
        400,
        {"error": {"message": "Missing 'method' in request body", "type": "Bad Request", "param": None, "code": 400}},
    )
    _, answer = await post(http, f"{base}/v1/completions", body(max_tokens=20))
    assert {weights_tag(w) for w in answer["choices"][0]["text"].split()} == {6}


# --- the prefix cache -------------------------------------------------------------------------------


@pytest.mark.usefixtures("dev_mode")
async def test_reset_prefix_cache(start_sim: StartSim, http: aiohttp.ClientSession) -> None:
    base, _ = await start_sim("--time-scale", "1")
    long_prompt = " ".join(["word"] * 64)
    hits = "vllm:prefix_cache_hits_total"
    for _ in range(2):
        await post(http, f"{base}/v1/completions", body(prompt=long_prompt, max_tokens=2))
    cached = await metric(http, base, hits)
    assert cached >= 48  # the second found the first's blocks
    stream = Streamed(http, base, body(max_tokens=100))
    await stream.until(2)
    assert await post(http, f"{base}/pause?mode=keep&clear_cache=false") == (200, {"status": "paused"})
    assert await post(http, f"{base}/reset_prefix_cache") == (200, {"success": False})  # a request holds KV
    assert await post(http, f"{base}/reset_prefix_cache?reset_running_requests=true") == (200, {"success": True})
    assert await post(http, f"{base}/resume") == (200, {"status": "resumed"})
    await asyncio.wait_for(stream.task, 5)
    assert stream.finish == "length" and len(stream.words) == 100  # preempted, recomputed, finished
    await post(http, f"{base}/v1/completions", body(prompt=long_prompt, max_tokens=2))
    assert await metric(http, base, hits) == cached  # the cache was emptied
    assert await post(http, f"{base}/reset_prefix_cache") == (200, {"success": True})
