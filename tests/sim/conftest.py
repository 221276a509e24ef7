"""Fixtures: a simulator in-process on a real loopback socket, and one as a real process for faults that exit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web

from mvllm_sim.cli import config_from, parser
from mvllm_sim.server import SimServer

from simkit import SimProcess, StartSim


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


@pytest.fixture
def sim_process() -> Iterator[Callable[..., SimProcess]]:
    started: list[SimProcess] = []

    def _start(*args: str) -> SimProcess:
        started.append(SimProcess(*args))
        return started[-1]

    yield _start
    for proc in started:
        proc.stop()
