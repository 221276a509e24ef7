"""A job's output: parts written as samples finish, then one sorted parquet file.

While a job runs, each finished sample is appended at once to `OUT.parts/journal.jsonl` (one JSON
line, one write per answer; no fsync), and in bulk to `OUT.parts/part-NNNNNN.parquet`, each part
sorted by (prompt_index, sample_index) and written atomically (temp file, fsync, rename), after which
the journal is emptied. A process that dies at any point (kill -9 included) loses no finished sample:
what no part holds yet is in the journal, whose lines a restart turns into a part (a line cut short
is dropped and its sample asked again). A power loss can lose what the page cache held: at most the
part writer's age limit. `DoneMap` (one bit per sample) says which samples the parts and the journal
already hold, for resuming.

At the end, `assemble` merges the parts out of core (k-way, in bounded windows; in several passes when
there are many parts), joins the input's columns back by prompt_index (an input column whose name
collides with an output column gets an `input_` prefix), writes a temp file beside OUT and renames it
over OUT. Only then are the parts removed (renamed away in one step, then deleted): OUT exists only
when it is complete, and a stop at any point leaves either the parts, from which a resume assembles
again without asking the servers for anything, or OUT complete.

A write that fails (a full disk, the parts directory removed by someone else) raises at once, naming
the path and the cause (`mvllmd.errors.storage_error`): the job ends, and what the parts hold stays
for `--resume` once the cause is fixed. A temp file a failed write leaves is removed.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mvllm.jobs import MAX_SAMPLES, Sample
from mvllmd.errors import MvllmError, storage_error
from mvllmd.jobs.input import InputInfo, iter_batches

KEY_BITS = (MAX_SAMPLES - 1).bit_length()  # sample_index < 65536: the sort key is prompt_index << 16 | sample_index
MERGE_FAN_IN = 32
WINDOW_ROWS = 8192
JOURNAL = "journal.jsonl"


class OutputError(MvllmError):
    """The output cannot be written or assembled."""


RESUME = "free space or fix it, then submit the job again with --resume: the finished samples are kept"


BASE_FIELDS = [
    pa.field("prompt_index", pa.int64(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("response", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("endpoint", pa.string()),
    pa.field("latency_s", pa.float64()),
    pa.field("seed", pa.int64()),
    pa.field("error", pa.string()),
    pa.field("weight_version", pa.string()),  # null where the servers have no version (Sample)
    pa.field("weight_versions", pa.list_(pa.string())),
]


def result_schema(logprobs: bool, token_ids: bool) -> pa.Schema:
    extra = []
    if logprobs:
        extra.append(pa.field("logprobs", pa.list_(pa.float64())))
    if token_ids:
        extra.append(pa.field("token_ids", pa.list_(pa.int32())))
    return pa.schema(BASE_FIELDS + extra)


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def removing_dir(output: Path) -> Path:
    """Where the parts go once OUT is complete, to be removed: a stop mid-removal leaves no parts
    that a resume would take for an unfinished run."""
    return output.with_name(f".{output.name}.parts-removing")


# --- which samples are done ----------------------------------------------------------------------


class DoneMap:
    """One bit per (prompt, sample): 1,000,000 prompts x 8 samples take 1 MB."""

    def __init__(self, num_prompts: int, num_samples: int) -> None:
        self.num_prompts, self.num_samples = num_prompts, num_samples
        self._bits = bytearray((num_prompts * num_samples + 7) // 8)
        self.count = 0

    def _bit(self, prompt: int, sample: int) -> tuple[int, int]:
        i = prompt * self.num_samples + sample
        return i >> 3, 1 << (i & 7)

    def is_done(self, prompt: int, sample: int) -> bool:
        byte, mask = self._bit(prompt, sample)
        return bool(self._bits[byte] & mask)

    def mark(self, prompt: int, sample: int) -> bool:
        """Mark a sample done; False when it already was (a duplicate, e.g. a hedged request's twin)."""
        byte, mask = self._bit(prompt, sample)
        if self._bits[byte] & mask:
            return False
        self._bits[byte] |= mask
        self.count += 1
        return True

    def prompt_done(self, prompt: int) -> bool:
        return all(self.is_done(prompt, s) for s in range(self.num_samples))


def load_done(parts: Path, done: DoneMap) -> int:
    """Mark what the parts and the journal already hold (only the parts' key columns are read);
    return how many samples."""
    before = done.count
    keys: list[tuple[int, int]] = []
    for part in sorted(parts.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["prompt_index", "sample_index"])
        keys.extend(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))
    keys.extend((s.prompt_index, s.sample_index) for s in read_journal(parts))
    for p, s in keys:
        if p < done.num_prompts and s < done.num_samples:
            done.mark(p, s)
    return done.count - before


def read_journal(parts: Path) -> list[Sample]:
    """The journal's samples; a last line cut short by a crash is left out."""
    try:
        data = (parts / JOURNAL).read_bytes()
    except FileNotFoundError:
        return []
    samples = []
    for line in data.split(b"\n"):
        try:
            samples.append(Sample(*json.loads(line)))
        except (ValueError, TypeError):
            continue  # cut short (only the last line can be): that sample is asked again
    return samples


# --- parts ---------------------------------------------------------------------------------------


class PartWriter:
    """Finished samples to the journal at once, and to `part-NNNNNN.parquet` files, each written
    atomically: every `flush_rows` samples, or once the oldest unwritten one is `flush_age_s` old,
    checked as samples arrive and by the job's clock (`flush_if_old`) when none do. A kill -9 loses
    nothing (the journal holds it); a power cut at most what is younger than `flush_age_s`."""

    def __init__(self, parts: Path, schema: pa.Schema, flush_rows: int = 4096, flush_age_s: float = 5.0) -> None:
        self._dir = parts
        self._schema = schema
        self._flush_rows = flush_rows
        self._flush_age_s = flush_age_s
        self._oldest = 0.0
        try:
            parts.mkdir(mode=0o755, parents=True, exist_ok=True)
            existing = [int(p.stem.split("-")[1]) for p in parts.glob("part-*.parquet")]
            self._next = max(existing, default=0) + 1
            self._rows = read_journal(parts)  # what a process that died had not put in a part yet
            self._journal = os.open(parts / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise storage_error(exc, "writing", parts, RESUME) from None
        self.flush()
        self._truncate()  # a line a crash cut short must not run into the next one

    @property
    def pending(self) -> int:
        return len(self._rows)

    def add(self, samples: Sequence[Sample]) -> None:
        """Journal the samples (one write), then hold them for the next part."""
        if not samples:
            return
        line = "".join(json.dumps(_values(s)) + "\n" for s in samples)
        try:
            _write_all(self._journal, line.encode())
        except OSError as exc:
            raise storage_error(exc, "writing", self._dir / JOURNAL, RESUME) from None
        now = time.monotonic()
        if not self._rows:
            self._oldest = now
        self._rows.extend(samples)
        if len(self._rows) >= self._flush_rows:
            self.flush()
        else:
            self.flush_if_old(now)

    def flush_if_old(self, now: float | None = None) -> None:
        if self._rows and (time.monotonic() if now is None else now) - self._oldest >= self._flush_age_s:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        rows = sorted(self._rows, key=lambda r: (r.prompt_index, r.sample_index))
        columns = {name: [getattr(r, name) for r in rows] for name in self._schema.names}
        table = pa.Table.from_pydict(columns, schema=self._schema)
        path = self._dir / f"part-{self._next:06d}.parquet"
        try:
            _write_atomically(table, path)
        except OSError as exc:
            if not self._dir.is_dir():
                raise OutputError(
                    f"{self._dir} was removed while the job ran, and the samples it held with it; submit the "
                    "job again with --resume (what is lost is asked again) or --overwrite"
                ) from None
            raise storage_error(exc, "writing", path, RESUME) from None
        self._truncate()  # a crash before this leaves samples twice; assembly keeps one
        self._next += 1
        self._rows.clear()

    def _truncate(self) -> None:
        try:
            os.ftruncate(self._journal, 0)
        except OSError as exc:
            raise storage_error(exc, "emptying", self._dir / JOURNAL, RESUME) from None

    def close(self) -> None:
        """Flush, and close the journal (closed even when the flush fails)."""
        try:
            self.flush()
        finally:
            os.close(self._journal)


_values = operator.attrgetter(*(f.name for f in fields(Sample)))  # a Sample as a tuple, in field order


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_atomically(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(table, tmp)
        _fsync(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk's partial file must not keep the space
        raise
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- assembly ------------------------------------------------------------------------------------


def assemble(
    parts: Path, output: Path, source: InputInfo, schema: pa.Schema, *, metadata: dict[str, str], expected_rows: int
) -> int:
    """Merge the parts and the input's columns into OUT, atomically; return the row count. A write
    that fails leaves no temp file or merged run behind, and the parts as they were."""
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        rows = _assemble(parts, output, tmp, source, schema, metadata, expected_rows)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        for run in parts.glob("run-*.parquet"):
            run.unlink(missing_ok=True)
        raise storage_error(exc, "assembling", output, RESUME) from None
    removing = removing_dir(output)
    shutil.rmtree(removing, ignore_errors=True)
    try:
        parts.rename(removing)  # one step: before it, a resume assembles again from the parts; after, none are left
    except OSError:
        removing = parts
    shutil.rmtree(removing, ignore_errors=True)  # a stop halfway leaves it for the next prepare to remove
    return rows


def _assemble(  # noqa: PLR0917
    parts: Path, output: Path, tmp: Path, source: InputInfo, schema: pa.Schema, metadata: dict[str, str],
    expected_rows: int,
) -> int:  # fmt: skip
    runs = sorted(parts.glob("part-*.parquet"))
    generation = 0
    while len(runs) > MERGE_FAN_IN:  # many parts: merge groups into longer sorted runs first
        generation += 1
        merged = []
        for i in range(0, len(runs), MERGE_FAN_IN):
            target = parts / f"run-{generation:02d}-{i // MERGE_FAN_IN:06d}.parquet"
            _merge(runs[i : i + MERGE_FAN_IN], target, schema)
            merged.append(target)
        for run in runs:
            if run.name.startswith("run-"):
                run.unlink()  # an earlier generation's run; parts stay until OUT is complete
        runs = merged
    rows = _final_merge(runs, tmp, source, schema, metadata)
    if rows != expected_rows:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"assembled {rows} rows where {expected_rows} were expected; the parts are kept")
    _fsync(tmp)
    tmp.replace(output)
    _fsync(output.parent)
    return rows


def _merge(runs: Sequence[Path], target: Path, schema: pa.Schema) -> None:
    with pq.ParquetWriter(target, schema) as writer:
        for window in _merged_windows(runs, schema):
            writer.write_table(window)


def _final_merge(
    runs: Sequence[Path], tmp: Path, source: InputInfo, schema: pa.Schema, metadata: dict[str, str]
) -> int:
    inputs = _InputCursor(source, set(schema.names))
    extra_fields = [pa.field(name, dtype) for name, dtype in inputs.fields()]
    out_schema = pa.schema([*schema, *extra_fields], metadata=metadata)
    rows = 0
    with pq.ParquetWriter(tmp, out_schema) as writer:
        for window in _merged_windows(runs, schema):
            extra = inputs.take(window.column("prompt_index"))
            table = pa.Table.from_arrays([*window.columns, *extra], schema=out_schema)
            writer.write_table(table)
            rows += table.num_rows
        if rows == 0:
            writer.write_table(out_schema.empty_table())
    return rows


def _merged_windows(runs: Sequence[Path], schema: pa.Schema) -> Iterator[pa.Table]:
    """The rows of sorted runs, merged, in sorted tables of bounded size; duplicates dropped."""
    batch_rows = max(64, WINDOW_ROWS // max(1, len(runs)))
    cursors = [_RunCursor(run, schema, batch_rows) for run in runs]
    last_key = -1
    while True:
        live = [c for c in cursors if c.fill()]
        if not live:
            return
        bound = min(c.last_key() for c in live)  # every run can give all its rows with key <= bound
        table = pa.concat_tables([c.take_upto(bound) for c in live])
        keys = _keys(table)
        order = pc.sort_indices(keys)
        table, keys = table.take(order), keys.take(order)
        keep = _first_of_each_key(keys.to_numpy(), last_key)
        if keep is not None:
            table = table.filter(keep)
        if table.num_rows:
            last_key = int(_keys(table)[-1].as_py())
            yield table


def _keys(table: pa.Table) -> pa.Array:
    prompt = pc.cast(table.column("prompt_index"), pa.int64())
    sample = pc.cast(table.column("sample_index"), pa.int64())
    return pc.add(pc.shift_left(prompt, KEY_BITS), sample).combine_chunks()


def _first_of_each_key(keys: Any, previous: int) -> pa.Array | None:
    """A mask keeping the first row of each key (and none equal to the previous window's last)."""
    import numpy as np  # noqa: PLC0415  (pyarrow's own dependency)

    if len(keys) == 0:
        return None
    shifted = np.concatenate(([previous], keys[:-1]))
    mask = keys != shifted
    return None if mask.all() else pa.array(mask)


class _RunCursor:
    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int) -> None:
        file = pq.ParquetFile(path)
        # A part written before a column existed (weight_version came later) has it null.
        has = set(file.schema_arrow.names)
        self._missing = [f for f in schema if f.name not in has]
        self._batches = file.iter_batches(batch_size=batch_rows, columns=[n for n in schema.names if n in has])
        self._schema = schema
        self._buffer: pa.Table | None = None

    def fill(self) -> bool:
        while self._buffer is None or self._buffer.num_rows == 0:
            batch = next(self._batches, None)
            if batch is None:
                return False
            table = pa.Table.from_batches([batch])
            for f in self._missing:
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
            self._buffer = table.select(self._schema.names).cast(self._schema)
        return True

    def last_key(self) -> int:
        assert self._buffer is not None
        return int(_keys(self._buffer.slice(self._buffer.num_rows - 1))[0].as_py())

    def take_upto(self, bound: int) -> pa.Table:
        assert self._buffer is not None
        count = int(pc.sum(pc.less_equal(_keys(self._buffer), bound)).as_py() or 0)  # sorted: a prefix
        taken, self._buffer = self._buffer.slice(0, count), self._buffer.slice(count)
        return taken


class _InputCursor:
    """The input's columns, read forward in prompt_index order, to join onto sorted output rows."""

    def __init__(self, source: InputInfo, taken: set[str]) -> None:
        self._batches = iter_batches(source)
        self._current: pa.RecordBatch | None = None
        self._start = 0
        first = next(self._batches, None)
        self._schema = first.columns.schema if first is not None else pa.schema([])
        self._current = first.columns if first is not None else None
        self._names = [f"input_{n}" if n in taken else n for n in self._schema.names]

    def fields(self) -> list[tuple[str, pa.DataType]]:
        return [(name, self._schema.field(i).type) for i, name in enumerate(self._names)]

    def take(self, prompt_index: pa.ChunkedArray) -> list[pa.Array]:
        """The input rows of these prompt indexes (ascending), one array per input column."""
        wanted = pc.cast(prompt_index, pa.int64()).combine_chunks()
        if not self._names:
            return []
        pieces: list[pa.RecordBatch] = []
        position = 0
        values = wanted.to_numpy()
        while position < len(values):
            self._advance_to(int(values[position]))
            assert self._current is not None
            end = self._start + self._current.num_rows
            upto = int((values < end).sum())
            local = pa.array(values[position:upto] - self._start)
            pieces.append(self._current.take(local))
            position = upto
        table = pa.Table.from_batches(pieces, schema=self._schema)
        return [table.column(i).combine_chunks() for i in range(table.num_columns)]

    def _advance_to(self, index: int) -> None:
        while self._current is not None and index >= self._start + self._current.num_rows:
            self._start += self._current.num_rows
            batch = next(self._batches, None)
            self._current = batch.columns.cast(self._schema) if batch is not None else None
        if self._current is None:
            raise OutputError(f"prompt_index {index} is beyond the end of the input")
