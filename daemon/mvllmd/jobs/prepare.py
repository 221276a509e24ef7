"""A job checked before anything is sent: the input, the output path, an existing output or earlier parts.

`prepare` checks everything that can be checked before the first request (the spec itself with
`mvllm.jobs.validate`, then the files) and returns what a run needs (run.py): the input's shape, the
samples earlier runs finished, or that the output is complete already. A manifest beside the parts
records the job's arguments (`fingerprint`); a resume with other arguments is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mvllm.jobs import InvalidSpec, JobSpec, validate
from mvllmd.errors import FULL, Conflict, InvalidRequest, OutOfSpace, cause
from mvllmd.jobs.input import FileIdentity, InputInfo, inspect
from mvllmd.jobs.output import DoneMap, load_done, parts_dir, removing_dir

MANIFEST = "manifest.json"


def fingerprint(spec: JobSpec, source: InputInfo | None = None) -> dict[str, object]:
    """What must not change between a run and its resume (the input file itself included: a resume
    against an edited input would mix old samples with new prompts). The input's size and time are
    `source`'s, as it was read, when given; else the file's now.

    It is the manifest beside the parts and the finished output's "mvllm.job" metadata, so it stays
    the same JSON, key for key and in this order, from release to release: a job that one release
    started, the next resumes. Hence the model inside "sampling", where it was before it moved to the
    spec."""
    read = source.identity if source is not None else FileIdentity.of(spec.input_path)
    identity = [read.size, read.mtime_ns] if read is not None else None
    sampling = spec.sampling
    found: dict[str, object] = {
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
    if spec.shard_count > 1:  # only then: the fingerprint of a whole-input job is what it always was
        found["shard"] = [spec.shard_index, spec.shard_count]
    return found


@dataclass(frozen=True)
class Prepared:
    spec: JobSpec
    source: InputInfo
    done: DoneMap
    complete: bool = False  # --resume of an output this job already finished: nothing to do

    @property
    def samples_total(self) -> int:
        return self.spec.shard_rows(self.source.num_rows) * self.spec.num_samples


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
    shutil.rmtree(removing_dir(out), ignore_errors=True)  # the parts of an OUT complete already
    if spec.resume and out.exists() and not parts.exists():
        _check_finished(out, spec, spec.shard_rows(source.num_rows) * spec.num_samples)
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
        if exc.errno in FULL:
            raise OutOfSpace(f"cannot write the output in {folder}: {cause(exc)}; free space there") from None
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
