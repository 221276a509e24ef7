"""One run of a job: it owns its dispatcher and its writer, and follows its endpoint source.

`Run.run()` feeds the dispatcher from the input with backpressure (memory does not grow with the
input: the feeder waits for the dispatcher's backlog to fall), writes each finished sample to a
part, and assembles OUT at the end. Meanwhile it follows its endpoint source (sources.py): a server
that joins takes work at once, one that leaves has its requests sent elsewhere. When `stop` is set
(SIGTERM, cancel, a failed sample with on_error fail) it stops feeding, lets the requests in flight
finish within `stop_drain_s`, writes their samples and returns with the parts kept: a later run with
`resume` redoes only what no part holds (prepare.py checks that it is the same job). A run whose parts
hold every sample already (a stop during the assembly) assembles without asking any server.

A write that fails (the journal, a part, the manifest, the assembly) ends the run at once with an
error that names the path and the cause; so does an input that changed under the job, found when a
read fails and checked before the assembly (input.check_unchanged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from mvllm.jobs import OnError, Sample
from mvllmd.dispatch.endpoints import Endpoints
from mvllmd.dispatch.flights import Work
from mvllmd.dispatch.loop import Dispatcher
from mvllmd.errors import InvalidRequest, MvllmError, storage_error
from mvllmd.jobs.input import InputError, check_unchanged, iter_batches
from mvllmd.jobs.output import RESUME, PartWriter, assemble, parts_dir, result_schema
from mvllmd.jobs.prepare import MANIFEST, Prepared, fingerprint
from mvllmd.jobs.sources import EndpointSource
from mvllmd.jobs.targets import Target
from mvllmd.metrics import NO_EVENTS, Events

log = logging.getLogger(__name__)

FEED_AHEAD = 4  # samples queued ahead of the dispatcher, per sample it may have in flight
FLUSH_AGE_S = 5.0  # finished samples are on disk within this long (parts)


@dataclass
class Progress:
    samples_total: int
    samples_done: int = 0
    errors: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    failed: str = ""  # why the job failed, with on_error = fail
    ended: float = 0.0  # when this run ended (monotonic); 0 while it runs

    @property
    def elapsed_s(self) -> float:
        return max(1e-9, (self.ended or time.monotonic()) - self.started)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s


@dataclass(frozen=True)
class LaneView:
    """What the run did on one server: the job's own counts there."""

    url: str
    instance: str
    inflight: int
    completed: int
    completion_tokens: int
    out: bool


class Run:
    def __init__(self, prepared: Prepared, source: EndpointSource, endpoints: Endpoints, stop: asyncio.Event, *,
                 stop_drain_s: float, on_progress: Callable[[Progress], None] = lambda p: None,
                 flush_age_s: float = FLUSH_AGE_S, events: Events = NO_EVENTS) -> None:  # fmt: skip
        self._prepared = prepared
        self._events = events
        self._source = source
        self._stop = stop
        self._stop_drain_s = stop_drain_s
        self._on_progress = on_progress
        self._flush_age_s = flush_age_s
        spec, done = prepared.spec, prepared.done
        self.progress = Progress(samples_total=prepared.samples_total, samples_done=done.count)
        self._schema = result_schema(spec.sampling.logprobs is not None, spec.sampling.return_token_ids)
        self._writer: PartWriter | None = None
        self._instance_of: dict[str, str] = {}  # url -> instance name
        self._dispatcher = Dispatcher(spec, endpoints, self._deliver, done.is_done, remaining=self._remaining)

    @property
    def inflight(self) -> int:
        return self._dispatcher.inflight

    @property
    def moves(self) -> int:
        return self._dispatcher.moves

    def _remaining(self) -> int:
        return self.progress.samples_total - self.progress.samples_done

    def views(self) -> list[LaneView]:
        """Per server, the job's own counts (a server that left shows while it had done something)."""
        now, named = time.monotonic(), self._instance_of
        lanes = [lane for lane in self._dispatcher.lanes() if not lane.left or lane.completed]
        return [LaneView(lane.url, named.get(lane.url, ""), lane.inflight, lane.completed, lane.tokens,
                         lane.endpoint.open_until > now) for lane in lanes]  # fmt: skip

    async def run(self) -> Progress:
        """Run the job; assemble OUT when every sample is done. Returns the final progress."""
        prepared, progress = self._prepared, self.progress
        if prepared.complete:
            progress.samples_done = progress.samples_total
            return progress
        if prepared.done.count < progress.samples_total:
            targets = self._source.current()
            if not targets:
                raise InvalidRequest("no endpoint to send the job to")
            try:
                await self._run(targets)
            finally:
                self._dispatcher.close()  # run() left its servers already, unless it never ran
        else:
            self._dispatcher.close()
        check_unchanged(prepared.source)
        progress.ended = time.monotonic()
        self._on_progress(progress)
        if prepared.done.count == progress.samples_total and not progress.failed:
            await self._assemble()
        return progress

    async def _run(self, targets: list[Target]) -> None:
        self._follow(targets)
        spec = self._prepared.spec
        parts = parts_dir(spec.output_path)
        self._writer = PartWriter(parts, self._schema, flush_age_s=self._flush_age_s)
        try:
            (parts / MANIFEST).write_text(json.dumps(fingerprint(spec, self._prepared.source), indent=2))
        except OSError as exc:
            self._writer.close()
            raise storage_error(exc, "writing", parts / MANIFEST, RESUME) from None
        helpers = [asyncio.create_task(c) for c in (self._flush_when_old(), self._follow_source(), self._stop_watch())]
        running = asyncio.create_task(self._dispatcher.run())
        try:
            await self._feed(running)
            self._dispatcher.close_input()
            await self._finish(running)
        finally:
            for task in (*helpers, running):  # the dispatcher too, should the feeder have failed
                task.cancel()
            await asyncio.gather(*helpers, running, return_exceptions=True)
            self._writer.close()

    # --- the servers -----------------------------------------------------------------------------

    def _follow(self, targets: list[Target]) -> None:
        """Listed servers join; those no longer listed leave (their requests go elsewhere)."""
        listed = {t.url: t for t in targets}
        for lane in self._dispatcher.lanes():
            if not lane.left and lane.url not in listed:
                log.info("%s left; its requests go elsewhere", self._instance_of.get(lane.url, lane.url))
                self._dispatcher.leave(lane.url)
        current = {lane.url for lane in self._dispatcher.lanes() if not lane.left}
        for target in targets:
            if target.url not in current:
                if target.instance:
                    self._instance_of[target.url] = target.instance
                self._dispatcher.join(target.url, target.capacity, target.api_key)

    async def _follow_source(self) -> None:
        while True:
            await self._source.changed()
            try:
                self._follow(self._source.current())
            except Exception:  # a bug here must not stop the job from following its servers
                log.exception("following the job's servers failed")

    # --- input and output ------------------------------------------------------------------------

    async def _feed(self, running: asyncio.Task[None]) -> None:
        spec, done, source = self._prepared.spec, self._prepared.done, self._prepared.source
        ahead = max(64, spec.max_concurrent * FEED_AHEAD) // spec.num_samples
        dispatcher = self._dispatcher
        batches = iter_batches(source)
        while True:
            try:
                batch = next(batches, None)
            except (OSError, pa.ArrowException, InputError) as exc:
                check_unchanged(source)  # the likeliest cause, and the clearest message
                raise InputError(f"cannot read the input {source.path}: {exc}") from None
            if batch is None:
                return
            for offset, prompt in enumerate(batch.prompts):
                index = batch.start + offset
                if not spec.in_shard(index):
                    continue
                todo = [s for s in range(spec.num_samples) if not done.is_done(index, s)]
                if not todo:
                    continue
                if dispatcher.backlog > ahead:
                    await dispatcher.room(ahead)  # backpressure: memory stays bounded whatever the input
                if self._stop.is_set() or running.done() or not dispatcher.accepting:
                    return
                dispatcher.add(Work(index, prompt, todo))
            await asyncio.sleep(0)

    async def _stop_watch(self) -> None:
        await self._stop.wait()
        self._dispatcher.drop_backlog()  # the feeder stops; requests in flight may finish

    async def _finish(self, running: asyncio.Task[None]) -> None:
        """Wait for the dispatcher; once stopped, give the requests in flight `stop_drain_s`."""
        stopped = asyncio.create_task(self._stop.wait())
        await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not running.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(running), timeout=self._stop_drain_s)
        if not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            return
        await running  # its exception, if it failed

    async def _deliver(self, samples: list[Sample]) -> None:
        # Marked before any await: a hedged twin's answer is filtered by is_done.
        done, progress, spec = self._prepared.done, self.progress, self._prepared.spec
        fresh = [s for s in samples if done.mark(s.prompt_index, s.sample_index)]
        assert self._writer is not None
        self._writer.add(fresh)
        for sample in fresh:
            progress.samples_done += 1
            progress.tokens += sample.completion_tokens or 0
            if sample.error:
                progress.errors += 1
                if spec.on_error == OnError.FAIL and not progress.failed:
                    progress.failed = f"prompt {sample.prompt_index}: {sample.error}"
                    self._stop.set()
        errors, tokens = sum(1 for s in fresh if s.error), sum(s.completion_tokens or 0 for s in fresh)
        self._events.samples(spec.model, len(fresh), errors, tokens)
        self._on_progress(progress)

    async def _flush_when_old(self) -> None:
        """Samples that finish just before a job stalls (a hung server, a slow tail) are written within
        the age limit all the same."""
        assert self._writer is not None
        while True:
            await asyncio.sleep(min(1.0, self._flush_age_s))
            try:
                self._writer.flush_if_old()
            except MvllmError as exc:  # a full disk, the parts removed: the job ends, saying so
                self._dispatcher.fail(exc)
                return

    async def _assemble(self) -> None:
        prepared, spec = self._prepared, self._prepared.spec
        metadata = {"mvllm.job": json.dumps(fingerprint(spec, prepared.source)), "model": spec.model}
        parts, total = parts_dir(spec.output_path), self.progress.samples_total
        rows = await asyncio.to_thread(assemble, parts, spec.output_path, prepared.source, self._schema,
                                       metadata=metadata, expected_rows=total)  # fmt: skip
        log.info("job output %s: %d rows, %d errors", spec.output_path, rows, self.progress.errors)
