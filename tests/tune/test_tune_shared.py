"""How a sweep shared among hosts (tune/shared.py) deals out the splits and gathers the hosts' trials, with
hosts that answer as scripted here: a host's sweep that breaks mid-way fails only its own unfinished
trials, and refusals are said once per reason. (Real daemons on emulated hosts share a sweep in
tests/fleet/test_fleet_tune.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mvllmd.errors import ResourceExhausted, Unreachable
from mvllmd.tune import report as reports
from mvllmd.tune.fit import Estimate, Fit
from mvllmd.tune.measure import Figure
from mvllmd.tune.report import Phase, Report, TrialState
from mvllmd.tune.shared import Update, run_shared
from mvllmd.tune.splits import Split

SPLITS = [Split(8, 1), Split(4, 2), Split(2, 4), Split(1, 8)]


def plan(fits: tuple[Fit, ...] = (Fit.FITS,) * 4) -> Report:
    trials = [TrialState(s, Estimate(f, usable_bytes=72 * 2**30)) for s, f in zip(SPLITS, fits, strict=True)]
    return Report("m", "sim", [f"sim-gpu:{i}" for i in range(8)], "", 100, 1, 16, 60.0, trials)


@dataclass
class Scripted:
    """A host whose sweep measures each split at `rate` tokens/s x its instances, or breaks after `breaks`
    trials; or refuses to plan."""

    host: str
    refuses: Exception | None = None
    breaks: int | None = None
    ran: list[tuple[Split, ...]] = field(default_factory=list)

    async def plan(self) -> Report:
        if self.refuses is not None:
            raise self.refuses
        return plan()

    async def run(self, configs: tuple[Split, ...]) -> AsyncIterator[Update]:
        self.ran.append(configs)
        sub = dataclasses.replace(plan(), trials=[TrialState(s, Estimate(Fit.FITS)) for s in configs], simulated=True)
        for index, trial in enumerate(sub.trials):
            if self.breaks == index:
                raise Unreachable(f"host {self.host} went away")
            trial.phase = Phase.DONE
            rate = 1000.0 * trial.split.instances
            trial.figure = Figure(rate, rate / 100, rate * 0.9, rate * 1.1, (rate,) * 8)
            await asyncio.sleep(0)
            yield sub, index
        sub.complete, sub.ended_at = True, 1.0
        yield sub, -1

    async def apply(self, split: Split) -> TrialState:
        return TrialState(split, Estimate(Fit.FITS), Phase.DONE, instances=[f"m-{i}" for i in range(split.instances)])


async def last(parts: list[Scripted], folder: Path, apply: bool = False) -> Report:
    updates = [report async for report, _ in run_shared(parts, apply, folder)]
    return updates[-1]


def test_the_splits_are_dealt_out_in_turn_and_gathered_as_one(tmp_path: Path) -> None:
    a, b = Scripted("host-a"), Scripted("host-b")
    report = asyncio.run(last([a, b], tmp_path, apply=True))
    assert a.ran == [(Split(8, 1), Split(2, 4))] and b.ran == [(Split(4, 2), Split(1, 8))]
    assert [t.host for t in report.trials] == ["host-a", "host-b", "host-a", "host-b"]
    assert report.hosts == ["host-a", "host-b"] and report.complete and report.simulated
    assert report.best == 0 and report.recommendation.startswith("8 x TP1: 8,000 output tokens per simulated second")
    assert report.speedup(report.trials[0]) == 8.0  # over 1 x TP8, measured on the other host
    assert report.applied == [f"{h}/m-{i}" for h in ("host-a", "host-b") for i in range(8)]
    kept = reports.load(tmp_path)
    assert kept is not None and [t.host for t in kept.trials] == [t.host for t in report.trials]


def test_a_host_that_breaks_mid_way_fails_its_own_unfinished_trials(tmp_path: Path) -> None:
    a, b = Scripted("host-a"), Scripted("host-b", breaks=1)  # b measures 4 x TP2, then goes away
    report = asyncio.run(last([a, b], tmp_path))
    assert [t.phase for t in report.trials] == [Phase.DONE, Phase.DONE, Phase.DONE, Phase.FAILED]
    assert report.trials[3].message == "host host-b went away"
    assert not report.complete and report.best == 0


def test_a_split_that_cannot_hold_the_model_is_not_dealt_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = Scripted("host-a"), Scripted("host-b")
    for part in (a, b):
        monkeypatch.setattr(part, "plan", _planned(plan((Fit.DOES_NOT_FIT, Fit.TIGHT, Fit.FITS, Fit.FITS))))
    report = asyncio.run(last([a, b], tmp_path))
    assert a.ran == [(Split(4, 2), Split(1, 8))] and b.ran == [(Split(2, 4),)]
    assert report.trials[0].phase is Phase.SKIPPED and report.trials[0].host == ""
    assert report.trials[0].message.startswith("not tried: ")


def test_refusals_are_said_once_per_reason_and_keep_their_kind(tmp_path: Path) -> None:
    full = ResourceExhausted("the model fits on none of these splits")
    parts = [Scripted("host-a", refuses=full), Scripted("host-b", refuses=full), Scripted("host-c")]
    with pytest.raises(ResourceExhausted) as raised:
        asyncio.run(last(parts, tmp_path))
    assert str(raised.value) == (
        "the sweep was planned on every host first, and nothing was started: host-a, host-b: the model fits on "
        "none of these splits"
    )
    assert all(not p.ran for p in parts)


def _planned(report: Report) -> object:
    async def planned() -> Report:
        return report

    return planned
