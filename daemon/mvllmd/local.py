"""Run a job in this process, without mvllmd: the daemon's one public entry point for other programs.

`mvllmctl generate-rollouts` calls `run_here` when no daemon answers; nothing else of the daemon is
meant to be imported from outside (scripts/house.py checks that mvllmctl keeps to it). The job runs
as the daemon would run it (the same checks, dispatcher, writer and defaults) over servers named by
URL, with the daemon's default settings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mvllm.jobs import JobSpec
from mvllmd.config import JobSettings, defaults
from mvllmd.dispatch.endpoints import Endpoints, Tuning
from mvllmd.errors import MvllmError, OutOfSpace, StorageError
from mvllmd.jobs.output import parts_dir
from mvllmd.jobs.prepare import prepare
from mvllmd.jobs.run import Progress, Run
from mvllmd.jobs.sources import UrlSource
from mvllmd.jobs.targets import Target, endpoint_model, normalize_url

__all__ = ["JobError", "OutOfSpace", "Outcome", "Progress", "StorageError", "run_here"]

JobError = MvllmError  # what the job refuses or fails with: its message says what to do
# Of which: OutOfSpace, a file system full (the output's); StorageError, another write that failed.


@dataclass(frozen=True)
class Outcome:
    progress: Progress
    parts: Path  # where the finished samples are kept while the job is not done

    @property
    def complete(self) -> bool:
        return self.progress.samples_done == self.progress.samples_total and not self.progress.failed


async def run_here(spec: JobSpec, stop: asyncio.Event, on_progress: Callable[[Progress], None] = lambda p: None,
                   ) -> Outcome:  # fmt: skip
    """Run `spec` (its `endpoints` name the servers) here until it is done or `stop` is set."""
    settings = defaults(JobSettings, "jobs")
    if not spec.endpoints:
        raise JobError("name the servers to send the job to (URLs)")
    urls = tuple(dict.fromkeys(normalize_url(u) for u in spec.endpoints))
    model = await endpoint_model(list(urls), spec.model, spec.endpoint_api_key)
    spec = replace(spec, endpoints=urls, model=model, max_concurrent=spec.max_concurrent or settings.max_concurrent)
    prepared = await asyncio.to_thread(prepare, spec)
    targets = [Target(url, settings.endpoint_max_num_seqs, spec.endpoint_api_key) for url in urls]
    endpoints = Endpoints(Tuning.of(settings))
    try:
        source = UrlSource(targets)
        run = Run(prepared, source, endpoints, stop, stop_drain_s=settings.stop_drain_s, on_progress=on_progress)
        progress = await run.run()
    finally:
        await endpoints.close()
    return Outcome(progress, parts_dir(spec.output_path))
