"""A sweep shared among alike fleet hosts (`mvllmctl tune --hosts`): the same splits, measured in a
fraction of the time.

Each host plans the sweep first (its devices free, the model and the prompts there, which splits hold
the model), and nothing starts unless every plan is made and all are alike: the same devices (kind,
count), the same splits, the same fits. The splits to try are then dealt out in turn (the first to the
first host, the second to the second, ...), and each host runs its share as a sweep of its own, at
once, within the whole budget. Their trials are gathered into one report, marked with their host, and
decided as one (report.py); with apply, every host then launches the best split for good. A host whose
sweep fails mid-way fails its unfinished trials, saying why; the others go on. Cancelled, every host's
sweep is cancelled, and each stops its own trial.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol

from mvllmd.errors import InvalidRequest, MvllmError
from mvllmd.tune import report as reports
from mvllmd.tune.report import Phase, Report, TrialState
from mvllmd.tune.splits import Split

Update = tuple[Report, int]  # the report, and the trial the update is about (-1: the sweep)
ENDED = (Phase.DONE, Phase.SKIPPED, Phase.FAILED)


class Part(Protocol):
    """One host's part of a shared sweep: this host's (sweep.Tuner) or a peer's (api/tune_service.py)."""

    @property
    def host(self) -> str: ...

    async def plan(self) -> Report:
        """The host's planned report; raises as its sweep would, before anything starts."""

    def run(self, configs: tuple[Split, ...]) -> AsyncIterator[Update]:
        """The host's sweep of `configs`: its updates; raises MvllmError if it fails."""

    async def apply(self, split: Split) -> TrialState:
        """Launch `split` for good on the host: DONE with its instances, or FAILED saying why."""


async def run_shared(parts: Sequence[Part], apply: bool, folder: Path) -> AsyncIterator[Update]:
    """The shared sweep's updates; the last one holds the whole report, also kept in `folder`."""
    plans = await _plans(parts)
    merged = _merged(plans, [p.host for p in parts])
    tried = [i for i, t in enumerate(merged.trials) if t.tried]
    shares = {p.host: tried[n :: len(parts)] for n, p in enumerate(parts)}
    news: asyncio.Queue[int | None] = asyncio.Queue()  # None: a host's sweep is over
    complete: dict[str, bool] = {}  # per host whose sweep is over: whether it ran to its end
    clocks: dict[str, bool] = {}  # per host with a measured trial: whether its figures are per simulated second

    async def follow(part: Part) -> None:
        mine = shares[part.host]
        try:
            async for sub, index in part.run(tuple(merged.trials[i].split for i in mine)):
                for i, trial in zip(mine, sub.trials, strict=True):
                    merged.trials[i] = dataclasses.replace(trial, host=part.host)
                if any(t.figure is not None for t in sub.trials):
                    clocks[part.host] = sub.simulated
                merged.simulated = bool(clocks) and all(clocks.values())
                complete[part.host] = sub.complete
                news.put_nowait(mine[index] if index >= 0 else -1)
        except MvllmError as exc:
            complete[part.host] = False
            for i in mine:
                if merged.trials[i].phase not in ENDED:
                    merged.trials[i] = dataclasses.replace(merged.trials[i], phase=Phase.FAILED, message=f"{exc}")
        finally:
            news.put_nowait(None)

    merged.started_at = time.time()
    yield merged, -1
    runs = [asyncio.create_task(follow(p)) for p in parts if shares[p.host]]
    try:
        running = len(runs)
        while running:
            index = await news.get()
            if index is None:
                running -= 1
            yield merged, -1 if index is None else index
        for run in runs:
            run.result()  # a host's part that failed for a reason other than its sweep's: a fault here
        merged.decide()
        if apply and merged.best >= 0:
            await _apply(parts, merged)
        merged.complete = all(complete.values())
    finally:
        for run in runs:
            run.cancel()
        await asyncio.shield(asyncio.gather(*runs, return_exceptions=True))
        merged.ended_at = time.time()
    with contextlib.suppress(MvllmError):  # not kept: the sweep ran all the same (sweep.py does so too)
        reports.save(folder, merged)
    yield merged, -1


async def _plans(parts: Sequence[Part]) -> list[Report]:
    """Every host's plan, or the first refusal (its kind: a model that fits nowhere stays exit 4), naming
    every host that refused; then whether they are alike."""
    outcomes = await asyncio.gather(*(p.plan() for p in parts), return_exceptions=True)
    refusals = [(p.host, o) for p, o in zip(parts, outcomes, strict=True) if isinstance(o, BaseException)]
    for _, outcome in refusals:
        if not isinstance(outcome, MvllmError):
            raise outcome
    if refusals:
        by_words: dict[str, list[str]] = {}  # alike hosts often refuse alike: each reason said once
        for host, exc in refusals:
            by_words.setdefault(str(exc), []).append(host)
        said = "; ".join(f"{', '.join(hosts)}: {words}" for words, hosts in by_words.items())
        raise type(refusals[0][1])(f"the sweep was planned on every host first, and nothing was started: {said}")
    plans = [o for o in outcomes if isinstance(o, Report)]
    first = _shape(plans[0])
    for part, plan in zip(parts[1:], plans[1:], strict=True):
        if _shape(plan) != first:
            raise InvalidRequest(
                f"tune --hosts shares the splits among alike hosts, and {parts[0].host} and {part.host} are not: "
                f"{_words(plans[0])} on {parts[0].host}, {_words(plan)} on {part.host}"
            )
    return plans


def _shape(plan: Report) -> tuple[object, ...]:
    kinds = tuple(d.split(":")[0] for d in plan.devices)
    return kinds, tuple((t.split, t.estimate.fit, t.estimate.usable_bytes) for t in plan.trials)


def _words(plan: Report) -> str:
    kind = plan.devices[0].split(":")[0] if plan.devices else "device"
    fits = ", ".join(f"{t.split} {t.estimate.fit.value.replace('_', ' ')}" for t in plan.trials)
    return f"{len(plan.devices)} {kind}s ({fits})"


def _merged(plans: list[Report], hosts: list[str]) -> Report:
    """The shared report as planned: the first host's plan, its trials fresh (those that cannot hold the
    model skipped, as a sweep skips them), every host named."""
    first = plans[0]
    trials = [dataclasses.replace(t) for t in first.trials]
    for trial in trials:
        if not trial.tried:
            trial.skip_untried()
    return dataclasses.replace(first, trials=trials, hosts=hosts, applied=[])


async def _apply(parts: Sequence[Part], merged: Report) -> None:
    """The best split launched for good on every host at once; what failed, said in the recommendation."""
    split = merged.trials[merged.best].split
    outcomes = await asyncio.gather(*(p.apply(split) for p in parts), return_exceptions=True)
    failures = []
    for part, outcome in zip(parts, outcomes, strict=True):
        if isinstance(outcome, TrialState):
            merged.applied += [f"{part.host}/{name}" for name in outcome.instances]
            if outcome.phase is Phase.FAILED:
                failures.append(f"{part.host}: {', '.join(outcome.instances)} launched, but {outcome.message}")
        elif isinstance(outcome, MvllmError):
            failures.append(f"{part.host}: not launched: {outcome}")
        else:
            raise outcome
    if failures:
        merged.recommendation += f" --apply: {'; '.join(failures)}."
