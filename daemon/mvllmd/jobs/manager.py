"""The daemon's jobs: submit, list, watch, cancel; a queue, fair shares, and resume after a restart.

A submitted job is checked at once (`mvllm.jobs.validate`, then input, output, model, targets),
recorded in the store, and queued. At most `max_running` jobs run; the rest wait QUEUED, oldest
first. Jobs that share a server share its batch: each gets an equal part of the server's
max_num_seqs. A job on this daemon's instances follows them as they come and go: a new READY
instance of its model takes work at once, one that stops, fails or restarts is retired (its
requests go elsewhere).

On SIGTERM (`close`), running jobs stop taking work, let their requests in flight finish within
`stop_drain_s`, and keep their parts; their records stay RUNNING or QUEUED, so the next start
resumes them. After a kill -9 the same happens from what the parts and their journal hold: the
parts directory, not the store, is the truth about which samples are done.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from mvllm.jobs import JobRecord, JobSpec, JobState, validate
from mvllmd.config import JobSettings
from mvllmd.errors import Conflict, MvllmError, NotFound
from mvllmd.instances.manager import InstanceManager
from mvllmd.instances.spec import InstanceState
from mvllmd.jobs.dispatch import Dispatcher, DispatchSettings, Endpoint
from mvllmd.jobs.output import parts_dir
from mvllmd.jobs.runner import Prepared, Progress, prepare, run_job
from mvllmd.jobs.store import JobStore
from mvllmd.jobs.targets import Target, endpoint_model, instance_model, instance_targets, normalize_url

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0  # how often a running job's counts are written to the store
WATCH_EVERY_S = 0.5
RESUME_WAIT_S = 1800.0  # a job resumed at start waits this long for a READY instance (the default start timeout)
WAIT_MESSAGE = "waiting up to {s:g}s for a READY instance of {model}"


@dataclass(frozen=True)
class EndpointView:
    url: str
    instance: str
    inflight: int
    completed: int
    completion_tokens: int
    out: bool


@dataclass(frozen=True)
class JobView:
    record: JobRecord
    tokens_per_s: float = 0.0
    eta_s: float = 0.0
    inflight: int = 0
    endpoints: tuple[EndpointView, ...] = ()


@dataclass(eq=False)
class _Job:
    record: JobRecord
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    prepared: Prepared | None = None
    dispatcher: Dispatcher | None = None
    progress: Progress | None = None
    capacity: dict[str, int] = field(default_factory=dict)  # url -> the server's own max_num_seqs
    instance_of: dict[str, str] = field(default_factory=dict)  # url -> instance name
    final_endpoints: tuple[EndpointView, ...] = ()  # the per-server counts when it last ran
    cancelled: bool = False
    saved_at: float = 0.0
    done_at_start: int = 0

    @property
    def uses_instances(self) -> bool:
        return not self.record.spec.endpoints


class JobManager:
    def __init__(self, store: JobStore, instances: InstanceManager, settings: JobSettings) -> None:
        self._store = store
        self._instances = instances
        self._settings = settings
        self._jobs: dict[str, _Job] = {}
        self._closing = False
        self._targets_changed = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the records; resume the jobs that were queued or running when the daemon stopped."""
        for record in self._store.load():
            job = _Job(record)
            self._jobs[record.id] = job
            if not record.state.ended and record.started_at:
                # It wrote parts already: finish them, never overwrite them. Its instances are being
                # adopted or started again at this very moment: wait for them as a start may take.
                wait_s = max(record.spec.wait_for_instances_s, RESUME_WAIT_S)
                record.spec = replace(record.spec, resume=True, overwrite=False, wait_for_instances_s=wait_s)
                log.info("job %s: resuming (%d of %d samples were done)", record.id, record.samples_done,
                         record.samples_total)  # fmt: skip
            if not record.state.ended:
                record.state = JobState.QUEUED
        self._follower = asyncio.create_task(self._follow_instances())
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
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
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
        job = _Job(record, prepared=prepared)
        self._jobs[record.id] = job
        self._store.save(record)
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
        """The job's progress every WATCH_EVERY_S until it ends (or the daemon stops)."""
        job = self._job(job_id)
        while True:
            yield self._view(job)
            if job.record.state.ended or self._closing:
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
        try:
            targets = await self._wait_for_targets(job)
            if targets is None:
                return  # stopped while it waited
            prepared = job.prepared if job.prepared is not None else await asyncio.to_thread(prepare, record.spec)
            job.prepared = None
            record.state, record.message = JobState.RUNNING, ""
            record.started_at = record.started_at or time.time()
            record.samples_total, record.samples_done = prepared.samples_total, _done(prepared)
            job.done_at_start = record.samples_done
            self._store.save(record)
            job.capacity = {t.url: t.capacity for t in targets}
            job.instance_of = {t.url: t.instance for t in targets if t.instance}
            endpoints = [Endpoint(t.url, t.capacity, t.api_key) for t in targets]
            progress = await run_job(
                prepared,
                endpoints,
                job.stop,
                dispatch=self._dispatch_settings(),
                on_progress=lambda p: self._progressed(job, p),
                on_start=lambda d: self._started(job, d),
                stop_drain_s=self._settings.stop_drain_s,
            )
            self._finish(job, progress)
        except MvllmError as exc:
            self._end(job, JobState.FAILED, str(exc))
        except Exception:
            log.exception("job %s failed", record.id)
            self._end(job, JobState.FAILED, "internal error in mvllmd; its log has the details")
        finally:
            job.final_endpoints = self._endpoint_views(job)
            job.task, job.dispatcher = None, None
            self._share_servers()
            self._schedule()

    async def _wait_for_targets(self, job: _Job) -> list[Target] | None:
        spec = job.record.spec
        if spec.endpoints:
            capacity, key = self._settings.endpoint_max_num_seqs, spec.endpoint_api_key
            return [Target(url, capacity, key) for url in spec.endpoints]
        deadline = time.monotonic() + spec.wait_for_instances_s
        model = spec.model
        while not (targets := instance_targets(self._instances, model)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Conflict(f"no instance serving {model} became READY within {spec.wait_for_instances_s:g}s")
            job.record.message = WAIT_MESSAGE.format(s=spec.wait_for_instances_s, model=model)
            self._targets_changed.clear()
            waiters = {asyncio.ensure_future(self._targets_changed.wait()), asyncio.ensure_future(job.stop.wait())}
            await asyncio.wait(waiters, timeout=min(left, 1.0), return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if job.stop.is_set():
                if job.cancelled:
                    self._end(job, JobState.CANCELLED, "cancelled while it waited for an instance")
                return None
        return targets

    def _started(self, job: _Job, dispatcher: Dispatcher) -> None:
        job.dispatcher = dispatcher
        self._share_servers()

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
            self._store.save(record)

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
            self._store.save(record)
        else:
            missing = progress.samples_total - progress.samples_done
            self._end(job, JobState.FAILED, f"{missing} samples were not done; the rest are kept in {parts}")

    def _end(self, job: _Job, state: JobState, message: str) -> None:
        record = job.record
        record.state, record.message, record.finished_at = state, message, time.time()
        self._store.save(record)
        level = logging.INFO if state is JobState.SUCCEEDED else logging.WARNING
        log.log(level, "job %s: %s: %s", record.id, state.value, message)

    # --- servers --------------------------------------------------------------------------------

    async def _follow_instances(self) -> None:
        events = self._instances.subscribe()
        try:
            while True:
                await events.get()
                while not events.empty():
                    events.get_nowait()
                self._targets_changed.set()
                try:
                    for job in self._jobs.values():
                        if job.dispatcher is not None and job.uses_instances:
                            self._follow(job, job.dispatcher)
                    self._share_servers()
                except Exception:  # a bug here must not stop jobs from following instances
                    log.exception("following the instances' changes failed")
        finally:
            self._instances.unsubscribe(events)

    def _follow(self, job: _Job, dispatcher: Dispatcher) -> None:
        """Add the instances that became READY to a running job; retire those that stopped, failed or
        restart. An UNHEALTHY one stays: the dispatcher's own hang detection and breaker judge its
        requests, and the instance manager restarts it if it stays so."""
        model = job.record.spec.model
        targets = {t.url: t for t in instance_targets(self._instances, model)}
        staying = {
            t.url for t in instance_targets(self._instances, model, InstanceState.READY, InstanceState.UNHEALTHY)
        }
        current = {e.url for e in dispatcher.endpoints if not e.retired}
        for url in current - staying:
            log.info("job %s: %s left; its requests go elsewhere", job.record.id, job.instance_of.get(url, url))
            dispatcher.retire_endpoint(url)
        for url in targets.keys() - current:
            target = targets[url]
            job.capacity[url], job.instance_of[url] = target.capacity, target.instance
            dispatcher.add_endpoint(Endpoint(url, target.capacity, target.api_key))

    def _share_servers(self) -> None:
        """Jobs that use the same server share its batch equally, and do not count each other's
        sequences there as outside load."""
        live = [(job, job.dispatcher) for job in self._jobs.values() if job.dispatcher is not None]
        by_url: dict[str, list[Endpoint]] = {}
        for _, dispatcher in live:
            for endpoint in dispatcher.endpoints:
                if not endpoint.retired:
                    by_url.setdefault(endpoint.url, []).append(endpoint)
        for job, dispatcher in live:
            for endpoint in dispatcher.endpoints:
                peers = [e for e in by_url.get(endpoint.url, []) if e is not endpoint]
                own = job.capacity.get(endpoint.url, endpoint.capacity)
                endpoint.set_capacity(max(1, own // (1 + len(peers))))
                endpoint.siblings = functools.partial(_inflight_of, peers)

    def _dispatch_settings(self) -> DispatchSettings:
        settings = self._settings
        return DispatchSettings(max_concurrent=settings.max_concurrent, hang_timeout_s=settings.hang_timeout_s)

    # --- views ----------------------------------------------------------------------------------

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}; `mvllmctl jobs` lists them")
        return job

    def _view(self, job: _Job) -> JobView:
        progress, dispatcher = job.progress, job.dispatcher
        if progress is None:
            return JobView(job.record, endpoints=job.final_endpoints)
        running = dispatcher is not None and not job.record.state.ended
        rate = (progress.samples_done - job.done_at_start) / progress.elapsed_s
        left = progress.samples_total - progress.samples_done
        eta = left / rate if rate > 0 and running else 0.0
        inflight = dispatcher.inflight if dispatcher is not None else 0
        return JobView(job.record, progress.tokens_per_s, eta, inflight, self._endpoint_views(job))

    def _endpoint_views(self, job: _Job) -> tuple[EndpointView, ...]:
        if job.dispatcher is None:
            return job.final_endpoints
        now = time.monotonic()
        return tuple(
            EndpointView(e.url, job.instance_of.get(e.url, ""), e.inflight, e.completed, e.tokens, e.open_until > now)
            for e in job.dispatcher.endpoints
            if not e.retired or e.completed
        )


def _inflight_of(endpoints: list[Endpoint]) -> int:
    return sum(e.inflight for e in endpoints)


def _done(prepared: Prepared) -> int:
    return prepared.samples_total if prepared.complete else prepared.done.count
