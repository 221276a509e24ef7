"""The live progress bar of a job, on stderr: samples, tokens/s, errors, ETA.

On a terminal it redraws in place; elsewhere (a log file, CI) it prints one line when the state
changes and at most every LOG_EVERY_S.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from mvllm.v1 import job_pb2 as pb

LOG_EVERY_S = 10.0


class JobProgress:
    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task: TaskID | None = None
        self._logged_at = 0.0
        self._logged_state = -1

    def __enter__(self) -> JobProgress:
        if self._tty:
            self._bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._tty:
            self._bar.stop()

    def update(self, job: pb.Job) -> None:
        state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
        detail = _detail(job)
        if not self._tty:
            now = time.monotonic()
            if job.state != self._logged_state or now - self._logged_at >= LOG_EVERY_S:
                self._logged_at, self._logged_state = now, job.state
                click.echo(f"job {job.id} {state}: {job.samples_done}/{job.samples_total} {detail}", err=True)
            return
        if self._task is None:
            self._task = self._bar.add_task(state, total=job.samples_total or None, detail=detail)
        self._bar.update(self._task, description=state, total=job.samples_total or None,
                         completed=job.samples_done, detail=detail)  # fmt: skip


def _detail(job: pb.Job) -> str:
    parts = [f"{job.tokens_per_second:,.0f} tok/s", f"{job.inflight} in flight"]
    if job.errors:
        parts.append(f"{job.errors} errors")
    if job.eta_seconds > 0:
        parts.append(f"ETA {_clock(job.eta_seconds)}")
    out = sum(1 for e in job.endpoints if e.out)
    if out:
        parts.append(f"{out} of {len(job.endpoints)} servers out")
    if job.state == pb.JOB_STATE_QUEUED and job.message:
        parts.append(job.message)
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
