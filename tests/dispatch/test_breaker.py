"""The breaker on its own: out after failures in a row, one probe when the cooldown ends, the cooldown
doubled once per failed probe, never once per request that was in flight when it opened."""

from __future__ import annotations

import logging

import pytest

from mvllmd.dispatch.breaker import MAX_COOLDOWN_S, Breaker, Change
from mvllmd.dispatch.endpoint import Endpoint


def test_it_opens_after_failures_in_a_row_and_a_success_resets_the_count() -> None:
    breaker = Breaker(failures=3, cooldown_s=2.0)
    assert [breaker.failed(0.0, 1.0) for _ in range(2)] == [Change.NONE, Change.NONE]
    assert breaker.succeeded() is Change.NONE
    assert [breaker.failed(0.0, 1.0) for _ in range(2)] == [Change.NONE, Change.NONE]  # counted afresh
    assert breaker.allows(1.0, busy=True)
    assert breaker.failed(0.0, 1.0) is Change.OPENED
    assert breaker.open_until == 3.0 and not breaker.allows(2.9, busy=False)


def test_requests_in_flight_when_it_opened_neither_count_nor_double_the_cooldown() -> None:
    """A server that died with 8 requests in flight: they all fail in the same millisecond."""
    breaker = Breaker(failures=1, cooldown_s=2.0)
    assert breaker.failed(started=0.0, now=5.0) is Change.OPENED
    assert [breaker.failed(started=0.1 * i, now=5.0) for i in range(1, 8)] == [Change.NONE] * 7
    assert breaker.cooldown_s == 2.0 and breaker.open_until == 7.0


def test_half_open_lets_one_request_go_and_a_failed_probe_doubles_once() -> None:
    breaker = Breaker(failures=1, cooldown_s=2.0)
    breaker.failed(0.0, 10.0)
    assert breaker.allows(12.0, busy=False) and not breaker.allows(12.0, busy=True)  # one probe at a time
    assert breaker.failed(started=12.0, now=12.5) is Change.REOPENED
    assert breaker.cooldown_s == 4.0 and breaker.open_until == 16.5
    assert breaker.failed(started=12.0, now=12.6) is Change.NONE  # sent before it reopened
    for _ in range(10):  # every failed probe doubles it, up to the ceiling
        breaker.failed(breaker.open_until, breaker.open_until)
    assert breaker.cooldown_s == MAX_COOLDOWN_S
    assert breaker.succeeded() is Change.CLOSED
    assert breaker.cooldown_s == 0 and breaker.allows(0.0, busy=True)


def test_a_hang_takes_it_out_for_at_least_the_hang_timeout() -> None:
    breaker = Breaker(failures=5, cooldown_s=2.0)
    breaker.take_out(now=1.0, at_least_s=30.0)
    assert breaker.open_until == 31.0
    breaker.take_out(now=40.0, at_least_s=30.0)
    assert breaker.cooldown_s == 60.0  # twice the last


def test_the_endpoint_logs_each_change_once(caplog: pytest.LogCaptureFixture) -> None:
    endpoint = Endpoint("http://127.0.0.1:9", capacity=8, failures=2, cooldown_s=2.0)
    with caplog.at_level(logging.INFO, logger="mvllmd.dispatch.endpoint"):
        for _ in range(20):  # 20 requests in flight fail at once when the server dies
            endpoint.failed(started=0.0, now=1.0)
        endpoint.failed(started=3.5, now=3.6)  # the probe, after the cooldown
        endpoint.succeeded(1, took_s=0.1, now=9.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "endpoint http://127.0.0.1:9 taken out for 2s after repeated failures",
        "endpoint http://127.0.0.1:9 still fails; taken out for 4s",
        "endpoint http://127.0.0.1:9 answers again; back in",
    ]
