"""The daemon's jobs: submit, list, watch, cancel; a queue, fair shares, and resume after a restart.

A submitted job is checked at once (`mvllm.jobs.validate`, then input, output, model, targets),
recorded in the store, and queued. At most `max_running` jobs run; the rest wait QUEUED, oldest
first. Each running job is a Run (run.py) with its own dispatcher and writer; the servers' state is
one table (dispatch/endpoints.py) shared by every job, so jobs that use the same server share its
batch: each gets an equal part of its limit. A job's servers come from an endpoint source
(sources.py): this daemon's instances of its model, followed as they come and go, or the URLs it
names.

A job exists once its record is saved: a submit whose save fails (the state directory full) creates
nothing and says so. Once a job runs, its parts are the truth: a progress or state record that cannot
be saved is logged once, and the job runs on (a restart resumes it from its parts).

On SIGTERM (`close`), running jobs stop taking work, let their requests in flight finish within
`stop_drain_s`, and keep their parts; their records stay RUNNING or QUEUED, so the next start
resumes them. After a kill -9 the same happens from what the parts and their journal hold: the
parts directory, not the store, is the truth about which samples are done.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from mvllm.jobs import JobRecord, JobSpec, JobState, validate
from mvllmd.config import DEFAULTS, JobSettings
from mvllmd.dispatch.endpoints import Endpoints, Tuning
from mvllmd.errors import Conflict, MvllmError, NotFound
from mvllmd.fleet import Fleet
from mvllmd.jobs.output import parts_dir
from mvllmd.jobs.prepare import Prepared, prepare
from mvllmd.jobs.run import LaneView, Progress, Run
from mvllmd.jobs.sources import EndpointSource, FleetSource, UrlSource
from mvllmd.jobs.store import JobStore
from mvllmd.jobs.targets import Target, endpoint_model, instance_model, instance_targets, normalize_url
from mvllmd.metrics import NO_EVENTS, Events

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0  # how often a running job's counts are written to the store
WATCH_EVERY_S = 0.5
WAIT_MESSAGE = "waiting up to {s:g}s for a READY instance of {model}"


@dataclass(frozen=True)
class JobView:
    record: JobRecord
    tokens_per_s: float = 0.0
    eta_s: float = 0.0
    inflight: int = 0
    endpoints: tuple[LaneView, ...] = ()
    samples_per_s: float = 0.0  # since this run began (a resumed job's earlier samples not counted)
    moves: int = 0  # requests moved in the tail, since this run began


@dataclass(eq=False)
class _Job:
    record: JobRecord
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    prepared: Prepared | None = None
    run: Run | None = None
    progress: Progress | None = None
    final_endpoints: tuple[LaneView, ...] = ()  # the per-server counts when it last ran
    final_moves: int = 0
    cancelled: bool = False
    saved_at: float = 0.0
    unsaved: bool = False  # its last record could not be saved (logged once)
    done_at_start: int = 0


class JobManager:
    def __init__(self, store: JobStore, instances: Fleet, settings: JobSettings,
                 resume_wait_s: float = DEFAULTS["instances.start_timeout_s"],
                 endpoints: Endpoints | None = None, *, events: Events = NO_EVENTS) -> None:  # fmt: skip
        self._store = store
        self._events = events  # samples, errors and tokens written, for the metrics
        self._instances = instances
        self._settings = settings
        self._resume_wait_s = resume_wait_s  # a job resumed at start waits this long for its instances
        self._owns_endpoints = endpoints is None  # else the daemon's, shared with the front door: it closes it
        self._endpoints = endpoints or Endpoints(Tuning.of(settings))
        self._jobs: dict[str, _Job] = {}
        self._closing = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the records; resume the jobs that were queued or running when the daemon stopped."""
        for record in self._store.load():
            job = _Job(record)
            self._jobs[record.id] = job
            if not record.state.ended and record.started_at:
                # It wrote parts already: finish them, never overwrite them. Its instances are being
                # adopted or started again at this very moment: wait for them as a start may take.
                wait_s = max(record.spec.wait_for_instances_s, self._resume_wait_s)
                record.spec = replace(record.spec, resume=True, overwrite=False, wait_for_instances_s=wait_s)
                log.info("job %s: resuming (%d of %d samples were done)", record.id, record.samples_done,
                         record.samples_total)  # fmt: skip
            if not record.state.ended:
                record.state = JobState.QUEUED
        self._schedule()

    async def close(self) -> None:
        """Stop every running job (its parts are kept; it resumes on the next start). Idempotent."""
        if self._closing:
            return
        self._closing = True
        running = [job for job in self._jobs.values() if job.task is not None]
        for job in running:
            job.stop.set()
        await asyncio.gather(*(job.task for job in running if job.task), return_exceptions=True)
        if self._owns_endpoints:
            await self._endpoints.close()
        self._store.close()

    # --- the API --------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> JobView:
        """Check the job and queue it; raise InvalidSpec, InvalidRequest or Conflict saying what is wrong."""
        if self._closing:
            raise Conflict("mvllmd is stopping; submit the job again when it is back")
        spec = await self._resolve(validate(spec))
        for other in self._jobs.values():
            if not other.record.state.ended and other.record.spec.output_path == spec.output_path:
                raise Conflict(f"job {other.record.id} is already writing {spec.output_path}")
        prepared = await asyncio.to_thread(prepare, spec)
        record = JobRecord(id=uuid.uuid4().hex[:12], spec=spec)
        record.samples_total, record.samples_done = prepared.samples_total, _done(prepared)
        try:
            self._store.save(record)  # first: a job the store does not hold does not exist
        except MvllmError as exc:
            raise type(exc)(f"{exc}; no job was created") from None
        job = _Job(record, prepared=prepared)
        self._jobs[record.id] = job
        log.info("job %s: submitted, %d samples to %s", record.id, record.samples_total, spec.output_path)
        self._schedule()
        return self._view(job)

    def get(self, job_id: str) -> JobView:
        return self._view(self._job(job_id))

    def list_jobs(self) -> list[JobView]:
        return [self._view(job) for job in self._jobs.values()]

    async def cancel(self, job_id: str) -> JobView:
        job = self._job(job_id)
        if job.record.state.ended:
            raise Conflict(f"job {job_id} has ended already ({job.record.state.value})")
        job.cancelled = True
        if job.task is None:
            self._end(job, JobState.CANCELLED, "cancelled before it started")
        else:
            job.stop.set()
            await asyncio.wait({job.task}, timeout=self._settings.stop_drain_s + 10)
        return self._view(job)

    async def watch(self, job_id: str) -> AsyncIterator[JobView]:
        """The job's progress every WATCH_EVERY_S until it ends (or the daemon stops); the last view
        given is the ended one."""
        job = self._job(job_id)
        while True:
            ended = job.record.state.ended  # as in the view: the job may end while the view is on its way
            yield self._view(job)
            if ended or self._closing:
                return
            await asyncio.sleep(WATCH_EVERY_S)

    def prune(self) -> tuple[list[str], list[str]]:
        """Remove ended jobs' records, and the parts of those that did not succeed."""
        ids, parts = [], []
        for job in [j for j in self._jobs.values() if j.record.state.ended]:
            folder = parts_dir(job.record.spec.output_path)
            busy = any(  # a later job (a --resume) may be finishing the same parts
                o.record.spec.output_path == job.record.spec.output_path and not o.record.state.ended
                for o in self._jobs.values()
            )
            if folder.is_dir() and not busy:
                shutil.rmtree(folder, ignore_errors=True)
                parts.append(str(folder))
            self._store.delete(job.record.id)
            del self._jobs[job.record.id]
            ids.append(job.record.id)
        return ids, parts

    # --- checks before a job is accepted --------------------------------------------------------

    async def _resolve(self, spec: JobSpec) -> JobSpec:
        """The spec with its targets' model, and its endpoints normalized; what is asked must be there."""
        model = spec.model
        if spec.endpoints:
            urls = tuple(dict.fromkeys(normalize_url(u) for u in spec.endpoints))
            model = await endpoint_model(list(urls), model, spec.endpoint_api_key)
            return replace(spec, endpoints=urls, model=model)
        model = instance_model(self._instances, model, waiting=spec.wait_for_instances_s > 0)
        if not instance_targets(self._instances, model) and not spec.wait_for_instances_s:
            raise Conflict(
                f"no instance serving {model} is READY yet (see `mvllmctl status`); "
                "pass --wait-for-instances SECONDS to queue the job until one is"
            )
        return replace(spec, model=model)

    # --- running --------------------------------------------------------------------------------

    def _schedule(self) -> None:
        if self._closing:
            return
        running = sum(1 for job in self._jobs.values() if job.task is not None)
        for job in self._jobs.values():
            if running >= self._settings.max_running:
                return
            if job.record.state is JobState.QUEUED and job.task is None:
                job.task = asyncio.create_task(self._run(job))
                running += 1

    async def _run(self, job: _Job) -> None:
        record = job.record
        source = self._source(record.spec)
        try:
            prepared = job.prepared if job.prepared is not None else await asyncio.to_thread(prepare, record.spec)
            job.prepared = None
            # A job whose parts hold every sample (stopped while it assembled) needs no server.
            if _done(prepared) < prepared.samples_total and not await self._wait_for_targets(job, source):
                return  # stopped while it waited
            record.state, record.message = JobState.RUNNING, ""
            record.started_at = record.started_at or time.time()
            record.samples_total, record.samples_done = prepared.samples_total, _done(prepared)
            job.done_at_start = record.samples_done
            self._save(job)
            concurrent = prepared.spec.max_concurrent or self._settings.max_concurrent
            prepared = replace(prepared, spec=replace(prepared.spec, max_concurrent=concurrent))
            job.run = Run(prepared, source, self._endpoints, job.stop, stop_drain_s=self._settings.stop_drain_s,
                          on_progress=lambda p: self._progressed(job, p), events=self._events)  # fmt: skip
            self._finish(job, await job.run.run())
        except MvllmError as exc:
            self._end(job, JobState.FAILED, str(exc))
        except Exception:
            log.exception("job %s failed", record.id)
            self._end(job, JobState.FAILED, "internal error in mvllmd; its log has the details")
        finally:
            source.close()
            job.final_endpoints = self._endpoint_views(job)
            job.final_moves = job.run.moves if job.run is not None else job.final_moves
            job.task, job.run = None, None
            self._schedule()

    def _source(self, spec: JobSpec) -> EndpointSource:
        if spec.endpoints:
            capacity, key = self._settings.endpoint_max_num_seqs, spec.endpoint_api_key
            return UrlSource([Target(url, capacity, key) for url in spec.endpoints])
        return FleetSource(self._instances, spec.model)

    async def _wait_for_targets(self, job: _Job, source: EndpointSource) -> bool:
        """Wait until a server of the job is ready; False if the job was stopped meanwhile."""
        spec = job.record.spec
        deadline = time.monotonic() + spec.wait_for_instances_s
        while not source.current():
            left = deadline - time.monotonic()
            if left <= 0:
                raise Conflict(f"no instance serving {spec.model} became READY within {spec.wait_for_instances_s:g}s")
            job.record.message = WAIT_MESSAGE.format(s=spec.wait_for_instances_s, model=spec.model)
            waiters = {asyncio.ensure_future(source.changed()), asyncio.ensure_future(job.stop.wait())}
            await asyncio.wait(waiters, timeout=min(left, 1.0), return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            if job.stop.is_set():
                if job.cancelled:
                    self._end(job, JobState.CANCELLED, "cancelled while it waited for an instance")
                return False
        return True

    def _progressed(self, job: _Job, progress: Progress) -> None:
        job.progress = progress
        record = job.record
        record.samples_done, record.errors, record.completion_tokens = (
            progress.samples_done,
            progress.errors,
            progress.tokens,
        )
        now = time.monotonic()
        if now - job.saved_at >= PROGRESS_EVERY_S:
            job.saved_at = now
            self._save(job)

    def _save(self, job: _Job) -> None:
        """Save a started job's record; if that fails, say so once and go on (its parts are the truth)."""
        try:
            self._store.save(job.record)
        except MvllmError as exc:
            if not job.unsaved:
                log.warning("job %s: its record cannot be saved (%s); the job goes on as it was: its "
                            "parts hold what it has done, and a restart resumes it from them", job.record.id,
                            exc)  # fmt: skip
            job.unsaved = True
            return
        if job.unsaved:
            log.info("job %s: its record is saved again", job.record.id)
        job.unsaved = False

    def _finish(self, job: _Job, progress: Progress) -> None:
        record = job.record
        self._progressed(job, progress)
        parts = parts_dir(record.spec.output_path)
        if progress.failed:
            self._end(job, JobState.FAILED, f"a sample failed and --on-error is fail: {progress.failed}; "
                                            f"the finished samples are kept in {parts}")  # fmt: skip
        elif progress.samples_done == progress.samples_total:
            errors = f", {progress.errors} of them with an error" if progress.errors else ""
            self._end(job, JobState.SUCCEEDED, f"{progress.samples_total} samples written{errors}")
        elif job.cancelled:
            self._end(job, JobState.CANCELLED, f"cancelled; {progress.samples_done} of {progress.samples_total} "
                                               f"samples are kept in {parts}: submit it again with --resume to "
                                               "finish it")  # fmt: skip
        elif self._closing:
            record.state, record.message = JobState.QUEUED, "mvllmd stopped; it resumes when mvllmd starts again"
            self._save(job)
        else:
            missing = progress.samples_total - progress.samples_done
            self._end(job, JobState.FAILED, f"{missing} samples were not done; the rest are kept in {parts}")

    def _end(self, job: _Job, state: JobState, message: str) -> None:
        record = job.record
        record.state, record.message, record.finished_at = state, message, time.time()
        self._save(job)
        level = logging.INFO if state is JobState.SUCCEEDED else logging.WARNING
        log.log(level, "job %s: %s: %s", record.id, state.value, message)

    # --- views ----------------------------------------------------------------------------------

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}; `mvllmctl jobs` lists them")
        return job

    def _view(self, job: _Job) -> JobView:
        progress, run = job.progress, job.run
        if progress is None:
            return JobView(job.record, endpoints=job.final_endpoints, moves=job.final_moves)
        running = run is not None and not job.record.state.ended
        rate = (progress.samples_done - job.done_at_start) / progress.elapsed_s
        left = progress.samples_total - progress.samples_done
        eta = left / rate if rate > 0 and running else 0.0
        inflight = run.inflight if run is not None else 0
        moves = run.moves if run is not None else job.final_moves
        return JobView(job.record, progress.tokens_per_s, eta, inflight, self._endpoint_views(job), rate, moves)

    def _endpoint_views(self, job: _Job) -> tuple[LaneView, ...]:
        return tuple(job.run.views()) if job.run is not None else job.final_endpoints


def _done(prepared: Prepared) -> int:
    return prepared.samples_total if prepared.complete else prepared.done.count
