"""An endpoint's hang watch: what its /metrics readings and its answers make of it, reading by reading.

Times are given, not waited for: `now` values a few seconds after the requests were sent.
"""

from __future__ import annotations

import time

from mvllmd.dispatch.endpoint import DOOR_IDLE_S, SILENT_STALLS, Endpoint
from mvllmd.dispatch.flights import Flights, Lane, Work
from mvllmd.transport.gauges import GENERATED, PROMPT, RUNNING, WAITING

STALL = 6.0
TIMEOUT = 120.0


def busy(inflight: int = 8) -> tuple[Endpoint, float]:
    endpoint = Endpoint("http://127.0.0.1:9", 64, stall_s=STALL)
    endpoint.sent(inflight)
    return endpoint, time.monotonic()


def reading(endpoint: Endpoint, at: float, running: int, waiting: int = 0, tokens: float = 100.0) -> None:
    endpoint.polling()
    endpoint.read({RUNNING: running, WAITING: waiting, GENERATED: tokens, PROMPT: 50.0}, at)


def test_token_counters_that_stand_still_for_a_stall_are_a_hang() -> None:
    # vLLM whose worker stopped: its gauges freeze as they were (here 8 running) and no token is made.
    endpoint, t0 = busy()
    reading(endpoint, t0 + 1, running=8)
    reading(endpoint, t0 + 1 + STALL - 0.5, running=8)
    assert endpoint.hung(t0 + 1 + STALL - 0.5, TIMEOUT) == ""
    reading(endpoint, t0 + 1 + STALL, running=8)
    why = endpoint.hung(t0 + 1 + STALL, TIMEOUT)
    assert why == "its /metrics shows no token made for 6s while 8 requests of ours were there (it runs 8, queues 0)"


def test_a_starved_server_that_makes_no_token_for_less_than_a_stall_is_not_hung() -> None:
    # The real vLLM CPU build on a starved machine: 7 s without a token while it counted 1 of our 23
    # (with the daemon's stall of 10 s; here the test's 6 s stands for it).
    endpoint, t0 = busy(23)
    for second in range(1, 6):
        reading(endpoint, t0 + second, running=1)
        assert endpoint.hung(t0 + second, TIMEOUT) == ""
    reading(endpoint, t0 + 6, running=1, tokens=130.0)  # it went on
    reading(endpoint, t0 + 6 + STALL - 1, running=1, tokens=130.0)
    assert endpoint.hung(t0 + 6 + STALL - 1, TIMEOUT) == ""


def test_counters_that_move_are_a_busy_server_not_a_hung_one() -> None:
    endpoint, t0 = busy()
    for second in range(1, 100):
        reading(endpoint, t0 + second, running=0, waiting=0, tokens=100.0 + second)
        assert endpoint.hung(t0 + second, TIMEOUT) == ""
    assert "completed nothing for" in endpoint.hung(t0 + TIMEOUT + 1, TIMEOUT)  # the fallback still holds


def test_the_stall_counts_from_the_last_answer() -> None:
    endpoint, t0 = busy()
    reading(endpoint, t0 + 1, running=0)
    endpoint.succeeded(1, 0.5, t0 + 6)  # an answer came: it was working then
    reading(endpoint, t0 + 1 + STALL, running=0)
    assert endpoint.hung(t0 + 1 + STALL, TIMEOUT) == ""
    reading(endpoint, t0 + 6 + STALL, running=0)
    assert "no token made for 6s" in endpoint.hung(t0 + 6 + STALL, TIMEOUT)


def test_nothing_in_flight_is_never_hung() -> None:
    endpoint, t0 = busy()
    endpoint.landed(8)
    reading(endpoint, t0 + 1, running=0)
    reading(endpoint, t0 + 100, running=0)
    assert endpoint.hung(t0 + 1000, TIMEOUT) == ""


def test_metrics_that_went_silent_tell_a_hang_too() -> None:
    endpoint, t0 = busy()
    reading(endpoint, t0 + 1, running=8)
    endpoint.unreadable()
    failed = time.monotonic()
    assert endpoint.hung(failed + SILENT_STALLS * STALL - 1, TIMEOUT) == ""
    assert "its /metrics has not answered for" in endpoint.hung(failed + SILENT_STALLS * STALL + 0.1, TIMEOUT)


def test_a_server_without_metrics_has_only_the_timeout() -> None:
    endpoint, t0 = busy()
    endpoint.unreadable()  # never answered: no gauges, not silent
    assert endpoint.hung(t0 + TIMEOUT - 1, TIMEOUT) == ""
    assert "completed nothing for" in endpoint.hung(t0 + TIMEOUT + 1, TIMEOUT)


def test_taken_out_it_is_not_judged_again_until_back() -> None:
    endpoint, t0 = busy()
    reading(endpoint, t0 + 1, running=0)
    reading(endpoint, t0 + 1 + STALL, running=0)
    why = endpoint.hung(t0 + 1 + STALL, TIMEOUT)
    endpoint.take_out_hung(t0 + 1 + STALL, TIMEOUT, why)
    assert endpoint.out and endpoint.hung(t0 + 2 + STALL, TIMEOUT) == ""


def test_jobs_leave_the_front_door_its_reserve_while_it_uses_the_server() -> None:
    endpoint = Endpoint("http://127.0.0.1:9", 64, door_reserve=0.1)
    endpoint.join(64)  # a job
    endpoint.join(64, shares=False)  # the front door
    assert endpoint.share() == 64  # the front door has sent nothing here: the job may hold it all
    endpoint.sent(1, door=True)
    assert endpoint.kept() == 7 and endpoint.share() == 57  # 10 % of 64, rounded up
    endpoint.sent(19, door=True)
    assert endpoint.kept() == 20 and endpoint.share() == 44  # more than the reserve: all its requests
    endpoint.join(64)  # a second job: they split what is left
    assert endpoint.share() == 22
    endpoint.landed(20, door=True)
    assert endpoint.kept() == 7
    endpoint.tick(time.monotonic() + DOOR_IDLE_S + 1)
    assert endpoint.kept() == 0 and endpoint.share() == 32  # the front door left a minute ago


def test_no_reserve_still_counts_the_front_doors_requests() -> None:
    endpoint = Endpoint("http://127.0.0.1:9", 8)
    endpoint.join(8)
    endpoint.sent(3, door=True)
    assert endpoint.share() == 5
    endpoint.sent(20, door=True)
    assert endpoint.share() == 1  # a job keeps one place, however busy the front door


def test_trips_and_hangs_are_counted_for_the_metrics() -> None:
    endpoint = Endpoint("http://127.0.0.1:9", 8, failures=2, cooldown_s=1.0)
    t0 = time.monotonic()
    for i in range(2):
        endpoint.failed(t0, t0 + i)
    assert endpoint.out and endpoint.trips == 1
    endpoint.failed(t0 + 3, t0 + 3.5)  # its probe, sent after it was taken out, failed: out again
    assert endpoint.trips == 2
    endpoint.failed(t0, t0 + 4)  # sent before it was taken out: counts for nothing
    assert endpoint.trips == 2 and endpoint.hangs == 0
    endpoint.take_out_hung(t0 + 5, TIMEOUT, "a test")
    assert endpoint.hangs == 1


def test_a_lane_counts_what_its_server_runs_not_the_finished_choices_still_in_flight() -> None:
    # Three requests of 8 samples each in flight, not streamed (24 counted until each request is back);
    # the server's gauges say 10 run and 2 wait (the other choices finished); then 8 more samples go.
    endpoint, flights = Endpoint("http://127.0.0.1:9", 64, stall_s=STALL), Flights()
    lane, t0 = Lane(endpoint), time.monotonic()
    sent = [flights.open(Work(p, "a prompt", list(range(8))), lane) for p in range(3)]
    assert lane.load == 24  # no reading yet: the load is all there is
    reading(endpoint, t0 + 1, running=10, waiting=2)
    assert lane.load == 12
    flights.open(Work(3, "a prompt", list(range(8))), lane)
    assert lane.load == 20  # what was sent since the reading counts at once
    for flight in sent:
        flights.land(flight)
    assert lane.load == 8  # never more than the load
    reading(endpoint, t0 + 2, running=3)
    assert lane.load == 3


def test_requests_of_one_sample_count_whole_whatever_a_reading_missed() -> None:
    # Eight one-sample requests in flight, of which the reading saw 5 (3 were on their way): none can
    # have finished unseen, so all 8 count; streamed ones release their finished choices themselves.
    endpoint, flights = Endpoint("http://127.0.0.1:9", 64, stall_s=STALL), Flights()
    lane = Lane(endpoint)
    for p in range(8):
        flights.open(Work(p, "a prompt", [0]), lane)
    flights.open(Work(8, "a prompt", list(range(4))), lane, streamed=True)
    reading(endpoint, time.monotonic(), running=5)
    assert lane.load == 12
