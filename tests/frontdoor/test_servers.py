"""The front door's choice of server, on the jobs' endpoint table: least-loaded, and sticky for sessions.

Load is put on a server the way front-door requests put it there (`Servers.send`); the servers'
speeds are not measured here (no /metrics reading), so every server counts as equally fast.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from test_app import Ready

from mvllmd.dispatch.endpoints import Endpoints, Tuning
from mvllmd.frontdoor.servers import Servers

A, B = "http://127.0.0.1:1", "http://127.0.0.1:2"


@pytest.fixture
async def servers() -> AsyncIterator[tuple[Servers, Ready]]:
    ready = Ready([("m", A, ""), ("m", B, "")])
    endpoints = Endpoints(Tuning(hang_timeout_s=30, metrics_interval_s=0))
    table = Servers(endpoints, ready, session_idle_s=60, sticky_factor=2.0)  # type: ignore[arg-type]
    yield table, ready
    await table.close()
    await endpoints.close()


def load(table: Servers, url: str, requests: int) -> None:
    lane = table.pick("m", 1, avoid=frozenset({A, B} - {url}))
    assert lane is not None and lane.url == url
    for _ in range(requests):
        table.send("m", lane, 1)


async def test_least_loaded_without_a_session(servers: tuple[Servers, Ready]) -> None:
    table, _ = servers
    load(table, A, 1)
    assert table.pick("m", 1).url == B  # type: ignore[union-attr]
    load(table, B, 2)
    assert table.pick("m", 1).url == A  # type: ignore[union-attr]
    assert table.pick("other", 1) is None


async def test_a_session_stays_until_its_server_would_take_more_than_twice_as_long(
    servers: tuple[Servers, Ready],
) -> None:
    table, _ = servers
    first = table.pick("m", 1, session="s")
    assert first is not None
    other = B if first.url == A else A
    load(table, first.url, 1)  # (1 + 1) against (0 + 1): twice as long, not more: it stays
    assert table.pick("m", 1, session="s").url == first.url  # type: ignore[union-attr]
    assert table.pick("m", 1).url == other  # type: ignore[union-attr]  # without a session: the least loaded
    load(table, first.url, 1)  # (2 + 1) against (0 + 1): it moves, and stays where it moved
    assert table.pick("m", 1, session="s").url == other  # type: ignore[union-attr]
    load(table, other, 1)  # (1 + 1) against (2 + 1) on the first: it stays on the other
    assert table.pick("m", 1, session="s").url == other  # type: ignore[union-attr]


async def test_a_session_moves_when_its_server_goes_and_forgets_when_idle(servers: tuple[Servers, Ready]) -> None:
    table, ready = servers
    first = table.pick("m", 1, session="s")
    assert first is not None
    ready.servers = [server for server in ready.servers if server[1] != first.url]
    table.sync()
    moved = table.pick("m", 1, session="s")
    assert moved is not None and moved.url != first.url
    ready.servers = [("m", A, ""), ("m", B, "")]
    table.sync()
    load(table, moved.url, 1)  # both back; the session's server is busier, within the factor: it stays
    assert table.pick("m", 1, session="s").url == moved.url  # type: ignore[union-attr]

    endpoints = Endpoints(Tuning(hang_timeout_s=30, metrics_interval_s=0))
    idle = Servers(endpoints, ready, session_idle_s=0.0, sticky_factor=2.0)  # type: ignore[arg-type]
    try:
        chosen = idle.pick("m", 1, session="t")
        assert chosen is not None
        load(idle, chosen.url, 1)  # a session idle longer than 0 s is forgotten: the least loaded again
        assert idle.pick("m", 1, session="t").url != chosen.url  # type: ignore[union-attr]
    finally:
        await idle.close()
        await endpoints.close()


async def test_the_front_door_takes_no_share_of_a_server_from_the_jobs() -> None:
    endpoints = Endpoints(Tuning(hang_timeout_s=30, metrics_interval_s=0))
    job = endpoints.join(A, 256)  # a job's lane on A: the whole limit while it is A's only job
    table = Servers(endpoints, Ready([("m", A, "")]))  # type: ignore[arg-type]
    try:
        lane = table.pick("m", 1)
        assert lane is not None and lane.endpoint is job  # one state per server, shared
        assert job.share() == 256
        table.send("m", lane, 3)
        assert job.inflight == 3  # its requests count in the server's load all the same
    finally:
        await table.close()
        endpoints.leave(job)
        await endpoints.close()
