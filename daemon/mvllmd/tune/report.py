"""A sweep's report: its trials as they go, the figures, the recommendation; kept as JSON in the state dir.

The figures are per second of the report's clock (the simulator's, when every instance had one). A
trial's speedup is over the measured split with the largest TP (the seed's table: "1 instance, TP=8" is
1.0x); its estimated total is the whole prompts file, num_samples each, at its samples per second. The
recommendation is the measured split with the most output tokens per second.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mvllmd.errors import storage_error
from mvllmd.tune.fit import Estimate, Fit
from mvllmd.tune.measure import Figure
from mvllmd.tune.splits import Split

LAST = "last.json"


class Phase(enum.StrEnum):
    PLANNED = "planned"
    LAUNCHING = "launching"
    WARMING_UP = "warming up"
    MEASURING = "measuring"
    STOPPING = "stopping"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass
class TrialState:
    split: Split
    estimate: Estimate
    phase: Phase = Phase.PLANNED
    message: str = ""
    progress: float = 0.0
    figure: Figure | None = None
    measured_s: float = 0.0
    launch_s: float = 0.0
    instances: list[str] = field(default_factory=list)
    host: str = ""  # the fleet host that measured it (a sweep over hosts, tune/shared.py); "": this one

    @property
    def tried(self) -> bool:
        return self.estimate.fit is not Fit.DOES_NOT_FIT

    def skip_untried(self) -> None:
        """A split that cannot hold the model: skipped, saying why."""
        self.phase, self.message = Phase.SKIPPED, f"not tried: {self.estimate.note}"


@dataclass
class Report:
    model: str
    engine: str
    devices: list[str]
    data_path: str
    rows: int
    num_samples: int
    max_tokens: int
    budget_s: float
    trials: list[TrialState]
    simulated: bool = False  # the figures are per simulated second
    best: int = -1
    recommendation: str = ""
    started_at: float = 0.0
    ended_at: float = 0.0
    complete: bool = False
    applied: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # the fleet hosts that shared the sweep; []: this one alone

    def speedup(self, trial: TrialState) -> float:
        measured = [t for t in self.trials if t.figure is not None]
        if trial.figure is None or not measured:
            return 0.0
        base = max(measured, key=lambda t: t.split.tp).figure
        return trial.figure.tokens_per_s / base.tokens_per_s if base and base.tokens_per_s > 0 else 0.0

    def total_s(self, trial: TrialState) -> float:
        """The whole file at the trial's samples per second, on the report's clock."""
        if trial.figure is None or trial.figure.samples_per_s <= 0:
            return 0.0
        return self.rows * self.num_samples / trial.figure.samples_per_s

    def decide(self) -> None:
        """The best measured split, and why."""
        measured = [i for i, t in enumerate(self.trials) if t.figure is not None]
        if not measured:
            self.best, self.recommendation = -1, "no split was measured: nothing to recommend"
            return
        self.best = max(measured, key=lambda i: self.trials[i].figure.tokens_per_s)  # type: ignore[union-attr]
        self.recommendation = _why(self, self.trials[self.best])


def _why(report: Report, best: TrialState) -> str:
    clock = "simulated second" if report.simulated else "second"
    assert best.figure is not None
    words = [f"{best.split}: {best.figure.tokens_per_s:,.0f} output tokens per {clock}"]
    others = [t for t in report.trials if t.figure is not None and t is not best]
    if others:
        runner = max(others, key=lambda t: t.figure.tokens_per_s)  # type: ignore[union-attr]
        assert runner.figure is not None
        gain = best.figure.tokens_per_s / runner.figure.tokens_per_s if runner.figure.tokens_per_s else 0.0
        words.append(f", {gain:.2f}x the next best ({runner.split})")
        if runner.figure.high >= best.figure.low:
            words.append(", though their spreads overlap: a longer --budget would tell them apart better")
    speedup = report.speedup(best)
    if speedup > 0 and best.split.tp != max(t.split.tp for t in report.trials if t.figure is not None):
        words.append(f"; {speedup:.1f}x the largest TP measured")
    skipped = [str(t.split) for t in report.trials if not t.tried]
    if skipped:
        words.append(f"; {', '.join(skipped)} cannot hold the model")
    tight = [t for t in report.trials if t.estimate.fit is Fit.TIGHT and t.figure is not None]
    if tight and best not in tight:
        words.append(f"; {', '.join(str(t.split) for t in tight)} holds it with little room for the KV cache")
    failed = [str(t.split) for t in report.trials if t.phase is Phase.FAILED]
    if failed:
        words.append(f"; {', '.join(failed)} did not serve (see the note)")
    return "".join(words) + "."


def save(folder: Path, report: Report) -> None:
    """Write the report as the last one, whole or not at all."""
    path = folder / LAST
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(report), indent=1))
        os.replace(temporary, path)
    except OSError as exc:
        raise storage_error(exc, "writing", path, "the sweep ran; its report was not kept") from None


def load(folder: Path) -> Report | None:
    """The last report, or None if there is none (or it cannot be read)."""
    try:
        raw = json.loads((folder / LAST).read_text())
        return _report(raw)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _report(raw: dict[str, Any]) -> Report:
    trials = [_trial(t) for t in raw.pop("trials")]
    return Report(**raw, trials=trials)


def _trial(raw: dict[str, Any]) -> TrialState:
    estimate = raw.pop("estimate")
    figure = raw.pop("figure")
    return TrialState(
        split=Split(**raw.pop("split")),
        estimate=Estimate(**{**estimate, "fit": Fit(estimate["fit"])}),
        phase=Phase(raw.pop("phase")),
        figure=None if figure is None else Figure(**{**figure, "intervals": tuple(figure["intervals"])}),
        **raw,
    )
