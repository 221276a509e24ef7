"""One rollout job, start to finish: input batches -> dispatcher -> parts -> one sorted parquet.

`prepare` checks everything that can be checked before any request is sent (the input, the output
path, an existing output or earlier parts) and returns what the run needs. `run_job` feeds the
dispatcher with backpressure (memory does not grow with the input), writes each finished sample to a
part, and assembles OUT at the end. When `stop` is set (SIGTERM, cancel) it stops feeding, lets the
requests in flight finish, writes their samples and returns with the parts kept: a later run with
`resume` redoes only what no part holds. A manifest beside the parts records the job's arguments
(`fingerprint`); a resume with other arguments is refused.

The job is a `mvllm.jobs.JobSpec` (its model resolved); how its dispatch is tuned, the daemon's
`DispatchSettings`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mvllm.jobs import InvalidSpec, JobSpec, OnError, Sample, validate
from mvllmd.errors import Conflict, InvalidRequest
from mvllmd.jobs.dispatch import Dispatcher, DispatchSettings, Endpoint, Work
from mvllmd.jobs.input import InputInfo, inspect, iter_batches
from mvllmd.jobs.output import DoneMap, PartWriter, assemble, load_done, parts_dir, result_schema

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FEED_AHEAD = 4  # samples queued ahead of the dispatcher, per sample it may have in flight
STOP_DRAIN_S = 30.0
FLUSH_AGE_S = 5.0  # finished samples are on disk within this long (parts)
DISPATCH = DispatchSettings()


def fingerprint(spec: JobSpec) -> dict[str, object]:
    """What must not change between a run and its resume (the input file itself included: a resume
    against an edited input would mix old samples with new prompts).

    It is the manifest beside the parts and the finished output's "mvllm.job" metadata, so it stays
    the same JSON, key for key and in this order, from release to release: a job that one release
    started, the next resumes. Hence the model inside "sampling", where it was before it moved to the
    spec."""
    try:
        stat = spec.input_path.stat()
        identity: list[int] | None = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        identity = None
    sampling = spec.sampling
    return {
        "input": str(spec.input_path),
        "input_size_mtime": identity,
        "prompt_column": spec.prompt_column,
        "num_samples": spec.num_samples,
        "sampling": {
            "model": spec.model,
            "max_tokens": sampling.max_tokens,
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
            "stop": list(sampling.stop),
            "seed": sampling.seed,
            "logprobs": sampling.logprobs,
            "return_token_ids": sampling.return_token_ids,
            "extra_body": dict(sampling.extra_body),
        },
        "policy": str(spec.policy),
    }


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
class Prepared:
    spec: JobSpec
    source: InputInfo
    done: DoneMap
    complete: bool = False  # --resume of an output this job already finished: nothing to do

    @property
    def samples_total(self) -> int:
        return self.source.num_rows * self.spec.num_samples


def prepare(spec: JobSpec) -> Prepared:
    """Check the job before anything is sent; raise InvalidRequest or Conflict saying what is wrong."""
    try:
        spec = validate(spec)
    except InvalidSpec as exc:
        raise InvalidRequest(str(exc)) from None
    source = inspect(spec.input_path, spec.prompt_column)
    out = spec.output_path
    if out.resolve() == spec.input_path.resolve():
        raise InvalidRequest(f"the output {out} is the input; write somewhere else")
    if out.suffix.lower() not in (".parquet", ".pq"):
        raise InvalidRequest(f"the output {out} must be a .parquet file")
    _check_writable(out.parent)
    if out.is_dir() or (out.exists() and not out.is_file()):
        raise InvalidRequest(f"the output {out} exists and is not a file; name a file")
    if out.exists() and not (spec.resume or spec.overwrite):
        raise Conflict(f"{out} exists; pass --resume to finish it, or --overwrite to replace it")
    parts = parts_dir(out)
    done = DoneMap(source.num_rows, spec.num_samples)
    if spec.resume and out.exists() and not parts.exists():
        _check_finished(out, spec, source.num_rows * spec.num_samples)
        return Prepared(spec, source, done, complete=True)
    if spec.overwrite:
        shutil.rmtree(parts, ignore_errors=True)
    elif parts.exists():
        if not spec.resume:
            raise Conflict(f"{parts} holds an unfinished run; pass --resume to finish it, or --overwrite")
        _check_manifest(parts, spec)
        load_done(parts, done)
    return Prepared(spec, source, done)


def _check_writable(folder: Path) -> None:
    """Create and remove a file there: permission bits say nothing to root, nor of /proc or a full disk."""
    if not folder.is_dir():
        raise InvalidRequest(f"cannot write the output: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mvllm-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InvalidRequest(f"cannot write the output in {folder}: {exc.strerror}") from None


def _check_finished(out: Path, spec: JobSpec, rows: int) -> None:
    """--resume of an existing OUT without parts: fine only if this very job wrote all of it."""
    try:
        meta = pq.read_metadata(out)
        recorded = json.loads((meta.metadata or {}).get(b"mvllm.job", b"null"))
    except (OSError, ValueError, pa.ArrowException):
        raise Conflict(f"{out} exists and is not an mvllm output; pass --overwrite to replace it") from None
    if recorded != json.loads(json.dumps(fingerprint(spec))) or meta.num_rows != rows:
        raise Conflict(f"{out} exists and was written by a different job; pass --overwrite to replace it")


def _check_manifest(parts: Path, spec: JobSpec) -> None:
    try:
        recorded = json.loads((parts / MANIFEST).read_text())
    except (OSError, ValueError):
        raise Conflict(f"{parts} has no readable {MANIFEST}; pass --overwrite to start again") from None
    wanted = json.loads(json.dumps(fingerprint(spec)))
    changed = sorted(k for k in wanted if recorded.get(k) != wanted[k])
    if changed:
        names = ", ".join("the input file (its size or time)" if k == "input_size_mtime" else k for k in changed)
        raise Conflict(
            f"cannot resume: {names} differ from the run that wrote {parts}; pass --overwrite to start again"
        )


async def run_job(
    prepared: Prepared,
    endpoints: list[Endpoint],
    stop: asyncio.Event,
    *,
    dispatch: DispatchSettings = DISPATCH,
    on_progress: Callable[[Progress], None] = lambda p: None,
    on_start: Callable[[Dispatcher], None] = lambda d: None,
    stop_drain_s: float = STOP_DRAIN_S,
    flush_age_s: float = FLUSH_AGE_S,
) -> Progress:
    """Run the job; assemble OUT when every sample is done. Returns the final progress.

    `dispatch` is the daemon's tuning of the dispatcher (the job's own choices are in its spec).
    `on_start` gets the dispatcher before the first request, so that the caller can add and retire
    endpoints and read per-endpoint counts while the job runs."""
    spec, source, done = prepared.spec, prepared.source, prepared.done
    if prepared.complete:
        return Progress(samples_total=prepared.samples_total, samples_done=prepared.samples_total)
    if not endpoints:
        raise InvalidRequest("no endpoint to send the job to")
    parts = parts_dir(spec.output_path)
    schema = result_schema(spec.sampling.logprobs is not None, spec.sampling.return_token_ids)
    writer = PartWriter(parts, schema, flush_age_s=flush_age_s)
    (parts / MANIFEST).write_text(json.dumps(fingerprint(spec), indent=2))
    progress = Progress(samples_total=source.num_rows * spec.num_samples, samples_done=done.count)

    async def deliver(samples: list[Sample]) -> None:
        # Marked before any await: a hedged twin's answer is filtered by is_done.
        fresh = [s for s in samples if done.mark(s.prompt_index, s.sample_index)]
        writer.add(fresh)
        for sample in fresh:
            progress.samples_done += 1
            progress.tokens += sample.completion_tokens or 0
            if sample.error:
                progress.errors += 1
                if spec.on_error == OnError.FAIL and not progress.failed:
                    progress.failed = f"prompt {sample.prompt_index}: {sample.error}"
                    stop.set()
        on_progress(progress)

    dispatcher = Dispatcher(endpoints, spec, dispatch, deliver, done.is_done,
                            remaining=lambda: progress.samples_total - progress.samples_done)  # fmt: skip
    on_start(dispatcher)
    clock = asyncio.create_task(_flush_when_old(writer, flush_age_s))
    try:
        running = asyncio.create_task(dispatcher.run())
        await _feed(prepared, dispatcher, stop)
        dispatcher.close_input()
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if running.done():
            await running  # its exception, if it failed
        else:
            await _drain(dispatcher, running, stop_drain_s)
    finally:
        clock.cancel()
        writer.close()
    progress.ended = time.monotonic()
    on_progress(progress)
    if done.count == progress.samples_total and not progress.failed:
        metadata = {"mvllm.job": json.dumps(fingerprint(spec)), "model": spec.model}
        rows = await asyncio.to_thread(assemble, parts, spec.output_path, source, schema,
                                       metadata=metadata, expected_rows=progress.samples_total)  # fmt: skip
        log.info("job output %s: %d rows, %d errors", spec.output_path, rows, progress.errors)
    return progress


async def _flush_when_old(writer: PartWriter, age_s: float) -> None:
    """Samples that finish just before a job stalls (a hung server, a slow tail) are written within
    the age limit all the same."""
    while True:
        await asyncio.sleep(min(1.0, age_s))
        writer.flush_if_old()


async def _feed(prepared: Prepared, dispatcher: Dispatcher, stop: asyncio.Event) -> None:
    spec, done = prepared.spec, prepared.done
    ahead = max(64, dispatcher.max_concurrent * FEED_AHEAD)
    for batch in iter_batches(prepared.source):
        for offset, prompt in enumerate(batch.prompts):
            index = batch.start + offset
            todo = [s for s in range(spec.num_samples) if not done.is_done(index, s)]
            if not todo:
                continue
            while dispatcher.backlog * spec.num_samples > ahead and not stop.is_set():
                await asyncio.sleep(0.01)  # backpressure: memory stays bounded whatever the input size
            if stop.is_set():
                return
            dispatcher.add(Work(index, prompt, todo))
        await asyncio.sleep(0)


async def _drain(dispatcher: Dispatcher, running: asyncio.Task[None], drain_s: float) -> None:
    """Stop sending new requests; give those in flight `drain_s` to finish; cancel the rest."""
    dispatcher.drop_backlog()
    try:
        await asyncio.wait_for(asyncio.shield(running), timeout=drain_s)
    except TimeoutError:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
