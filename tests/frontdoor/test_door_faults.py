"""The front door of a real mvllmd under faults of its servers: requests that had not begun when their
server failed go elsewhere, and the client sees no error.

The other faults are tested closer in: a server answering 503s (test_app.py), a stream cut mid-way and
continued (test_continued.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import openai

from daemonkit import DaemonProcess, Spawn, wait_for
from jobkit import daemon_args, instance, launch

REQUESTS = 300
AT_ONCE = 48


def front_door(daemon: DaemonProcess) -> str:
    (url,) = json.loads(daemon.ctl("info", "--json").stdout)["http_urls"]
    return str(url)


async def load(url: str, during: asyncio.Event) -> list[str]:
    """REQUESTS completions, AT_ONCE at a time, through the front door; `during` is set once a third are
    done. Returns the error of each that failed (the client never retries: max_retries=0)."""
    errors: list[str] = []
    done = 0
    gate = asyncio.Semaphore(AT_ONCE)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:

        async def one(i: int) -> None:
            nonlocal done
            async with gate:
                try:
                    answer = await client.completions.create(model="m", prompt=f"request {i}", max_tokens=32)
                    assert answer.choices[0].text
                except openai.OpenAIError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                done += 1
                if done == REQUESTS // 3:
                    during.set()

        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    return errors


def test_an_instance_killed_under_load(short_tmp: Path, spawn: Spawn) -> None:
    daemon = spawn(daemon_args(short_tmp))
    launch(daemon, 2, "--time-scale", "0.05")
    pid = instance(daemon, "m-0")["pid"]

    async def run() -> list[str]:
        third = asyncio.Event()
        traffic = asyncio.create_task(load(front_door(daemon), third))
        await third.wait()
        os.kill(pid, signal.SIGKILL)  # its requests in flight are cut before their answers began
        return await traffic

    assert asyncio.run(run()) == []
    wait_for(lambda: instance(daemon, "m-0")["restarts"] >= 1, timeout=30)  # the kill did land


def test_an_instance_that_hangs_with_health_200(short_tmp: Path, spawn: Spawn) -> None:
    # The daemon's own health check would take 5 minutes: the front door's servers are watched through
    # their /metrics, where a hung engine's token counters stand still (out in about 11 s).
    daemon = spawn(daemon_args(short_tmp, "--hang-timeout", "300"))
    launch(daemon, 1, "--time-scale", "0.05", name="good")
    launch(daemon, 1, "--time-scale", "0.05", "--hang-after-requests", "40", name="hangs")
    hung = instance(daemon, "hangs-0")["url"]

    async def run() -> list[str]:
        return await load(front_door(daemon), asyncio.Event())

    assert asyncio.run(run()) == []
    assert f"endpoint {hung}: its /metrics shows no token made for" in daemon.stderr
    assert instance(daemon, "hangs-0")["state"] == "INSTANCE_STATE_READY"  # to the daemon: /health says 200
