"""The front door of a real mvllmd: its instances behind one URL, for the official openai client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai

from daemonkit import DaemonProcess, Spawn, assert_short_error, run_mvllmd
from jobkit import FAST_SIM, daemon_args, launch


def front_door(daemon: DaemonProcess) -> str:
    done = daemon.ctl("info", "--json")
    assert done.returncode == 0, done.stderr
    (url,) = json.loads(done.stdout)["http_urls"]
    return str(url)


def test_the_openai_client_through_the_front_door(short_tmp: Path, spawn: Spawn) -> None:
    daemon = spawn(daemon_args(short_tmp))
    url = front_door(daemon)
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
    assert f"front door     {url}\n" in daemon.ctl("info").stdout
    launch(daemon, 2, *FAST_SIM, model="m")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    assert [m.id for m in client.models.list()] == ["m"]
    completion = client.completions.create(model="m", prompt="Once upon a time", max_tokens=8, n=3)
    assert len(completion.choices) == 3 and completion.usage is not None and completion.usage.completion_tokens > 0
    stream = client.completions.create(model="m", prompt="hello", max_tokens=12, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    async def chat() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as aclient:

            async def one(i: int) -> str:
                messages = [{"role": "user", "content": f"question {i}"}]
                parts = []
                async for chunk in await aclient.chat.completions.create(
                    model="m",
                    messages=messages,
                    max_tokens=6,
                    stream=True,  # type: ignore[arg-type]
                ):
                    if chunk.choices and chunk.choices[0].delta.content:
                        parts.append(chunk.choices[0].delta.content)
                return "".join(parts)

            return await asyncio.gather(*(one(i) for i in range(20)))

    assert all(asyncio.run(chat()))

    try:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    except openai.NotFoundError as exc:
        assert "The model `nope` does not exist. Served: m." in str(exc)
    else:
        raise AssertionError("an unknown model was served")


def test_a_front_door_port_in_use_is_a_start_up_error(short_tmp: Path, spawn: Spawn) -> None:
    first = spawn(daemon_args(short_tmp))
    taken = front_door(first)
    # Another state directory and socket: the port is what the two collide on, and the error says so.
    args = ["--listen", f"unix:{short_tmp}/b.sock", "--state-dir", str(short_tmp / "b"), "--http-listen", taken]
    done = run_mvllmd(args, first.env)
    assert_short_error(done, 2, f"cannot listen on {taken} (the HTTP front door)", "--http-listen none")
    # The same state directory: refused for that, before any front door binds.
    same = run_mvllmd(["--listen", f"unix:{short_tmp}/c.sock", "--state-dir", str(short_tmp / "j-state")], first.env)
    assert same.returncode != 0 and "state directory" in same.stderr, same.stderr
    assert "front door" not in same.stderr


def test_off_loopback_a_missing_or_wrong_token_is_401(short_tmp: Path, spawn: Spawn) -> None:
    tokens = short_tmp / "tokens"
    tokens.write_text("first-token\nsecond-token\n")
    tokens.chmod(0o600)
    listen = ["--http-listen", "http://0.0.0.0:0", "--insecure-http", "--http-token-file", str(tokens)]
    daemon = spawn(daemon_args(short_tmp, *listen))
    url = front_door(daemon)
    assert url.startswith("http://0.0.0.0:")
    launch(daemon, 1, *FAST_SIM, model="m")
    local = url.replace("0.0.0.0", "127.0.0.1")  # every address: the test's traffic stays on loopback
    body = {"model": "m", "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong-token"}, {"authorization": "Basic first-token"}):
        refused = httpx.post(f"{local}/v1/completions", json=body, headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["type"] == "AuthenticationError"
        assert refused.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{local}/v1/models").status_code == 401
    assert httpx.get(f"{local}/health").status_code == 200  # for load balancers' checks
    for token in ("first-token", "second-token"):
        answer = httpx.post(f"{local}/v1/completions", json=body, headers={"authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
