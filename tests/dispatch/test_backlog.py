"""The backlog on its own: what is taken in which order, cut, split, and the feeder held back."""

from __future__ import annotations

import asyncio

from mvllmd.dispatch.backlog import Backlog
from mvllmd.dispatch.flights import Work


def test_work_put_back_goes_first_and_done_samples_are_dropped() -> None:
    done = {(0, 1)}
    backlog = Backlog(lambda p, s: (p, s) in done, seeded=False)
    backlog.add(Work(0, "a", [0, 1, 2]))
    backlog.add(Work(1, "b", [0]))
    backlog.again(Work(2, "c", [5]))
    taken = [backlog.take(0.0, split_tail=True) for _ in range(3)]
    assert [(w.prompt_index, w.samples) for w in taken if w] == [(2, [5]), (0, [0, 2]), (1, [0])]
    assert backlog.take(0.0, split_tail=True) is None and backlog.asked == 4


def test_seeded_work_is_cut_at_its_first_gap_and_the_tail_is_split() -> None:
    backlog = Backlog(lambda p, s: False, seeded=True)
    backlog.add(Work(0, "a", [0, 1, 3, 4]))
    first = backlog.take(0.0, split_tail=True)
    assert first is not None and first.samples == [0, 1]  # not in the tail yet: the run stays whole
    backlog.input_done = True
    rest = backlog.take(0.0, split_tail=True)
    assert rest is not None and rest.samples == [3]  # the tail: one sample, the other put back
    assert [w.samples for w in (backlog.take(0.0, split_tail=True),) if w] == [[4]]


def test_cut_and_retries_that_wait_out_their_backoff() -> None:
    backlog = Backlog(lambda p, s: False, seeded=False)
    cut = backlog.cut(Work(0, "a", [0, 1, 2, 3]), room=3)
    assert cut.samples == [0, 1, 2] and len(backlog) == 1
    assert backlog.cut(Work(1, "b", [0, 1]), room=0).samples == [0, 1]  # no room at all: not cut to nothing
    backlog.take(0.0, split_tail=False)
    backlog.later(Work(2, "c", [0]), due=5.0)
    assert backlog.next_due == 5.0
    assert backlog.take(4.9, split_tail=False) is None
    assert backlog.take(5.0, split_tail=False) is not None


async def test_the_feeder_waits_until_the_backlog_falls() -> None:
    backlog = Backlog(lambda p, s: False, seeded=False)
    for p in range(10):
        backlog.add(Work(p, "x", [0]))
    waiting = asyncio.create_task(backlog.room(most=4))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    for _ in range(6):
        backlog.take(0.0, split_tail=False)
    backlog.taken()
    await asyncio.wait_for(waiting, 1)
    stuck = asyncio.create_task(backlog.room(most=0))
    await asyncio.sleep(0.01)
    backlog.close(drop=False)  # the dispatcher ended: nobody will take more
    await asyncio.wait_for(stuck, 1)
