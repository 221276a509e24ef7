"""A simulator in-process on a real loopback socket, and one as a real process for faults that exit."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mvllm_sim.cli import config_from, parser
from mvllm_sim.server import SimServer

MVLLM_SIM = str(Path(sys.executable).parent / "mvllm-sim")
StartSim = Callable[..., Awaitable[tuple[str, SimServer]]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """`await start_sim("--time-scale", "0", ...)` -> (base URL, server), built from mvllm-sim's own flags."""
    runners: list[web.AppRunner] = []

    async def _start(*args: str) -> tuple[str, SimServer]:
        server = SimServer(config_from(parser().parse_args(["--model", "sim", *args])))
        runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}", server

    yield _start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SimProcess:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [MVLLM_SIM, "--model", "sim", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mvllm-sim exited {self.proc.returncode}: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("mvllm-sim did not open its port")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def sim_process() -> Iterator[Callable[..., SimProcess]]:
    started: list[SimProcess] = []

    def _start(*args: str) -> SimProcess:
        started.append(SimProcess(*args))
        return started[-1]

    yield _start
    for proc in started:
        proc.stop()


def completion_body(**extra: Any) -> dict[str, Any]:
    return {"model": "sim", "prompt": "The quick brown fox", "max_tokens": 12, **extra}
