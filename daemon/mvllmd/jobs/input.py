"""A job's input: parquet or JSONL (by extension), read in batches, never whole.

The prompt column (`prompt` unless told) holds, per row, either a string (sent to /v1/completions) or a
list of {role, content} messages (sent to /v1/chat/completions). `inspect` checks the file before a job
is accepted: readable, a known format, the column present and of a usable type. Rows are numbered
from 0 in file order: that is the prompt_index of the output.

The file is not trusted to stay as it was: `inspect` records its identity (size, modification time,
inode), and `check_unchanged` compares it before the output is assembled, and whenever a read fails.
A job whose input changed under it fails saying what changed; its finished samples are kept.

JSONL has no schema: `inspect` reads the whole file once (a batch at a time) and settles one type per
field for all of it (ints and floats as floats, a field missing from some rows as null there, a field
whose values cannot share a type as JSON text), so that every batch has the same columns and types.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from mvllmd.errors import InvalidRequest

Format = Literal["parquet", "jsonl"]
PromptKind = Literal["text", "chat"]
FORMATS: dict[str, Format] = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
BATCH_ROWS = 4096


class InputError(InvalidRequest):
    """The input file cannot be used as it is."""


@dataclass(frozen=True)
class FileIdentity:
    """What says a file is the one that was read: a rewrite changes the size or time, a replacement the inode."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return cls(stat.st_size, stat.st_mtime_ns, stat.st_ino)

    def change(self, now: FileIdentity | None) -> str:
        """What changed from this identity to `now`, in words; "" when nothing did."""
        if now is None:
            return "it was removed"
        if now.size != self.size:
            return f"its size went from {self.size:,} to {now.size:,} bytes"
        if now.inode != self.inode:
            return "another file was put in its place"
        if now.mtime_ns != self.mtime_ns:
            return f"it was modified at {_clock(now.mtime_ns)}, after it was read at {_clock(self.mtime_ns)}"
        return ""


def _clock(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


@dataclass(frozen=True)
class InputInfo:
    path: Path
    format: Format
    num_rows: int
    prompt_column: str
    prompt_kind: PromptKind
    columns: tuple[str, ...]
    types: tuple[pa.DataType | None, ...] = ()  # JSONL: each column's type for the whole file; None: JSON text
    identity: FileIdentity | None = None  # the file as `inspect` found it, before it read it


def input_format(path: Path) -> Format:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unknown input format {path.suffix!r}; use .parquet or .jsonl")
    return fmt


def inspect(path: Path, prompt_column: str = "prompt") -> InputInfo:
    """Check the input file and describe it; raise InputError saying what is wrong."""
    fmt = input_format(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    identity = FileIdentity.of(path)
    info = _inspect_parquet(path, prompt_column) if fmt == "parquet" else _inspect_jsonl(path, prompt_column)
    return replace(info, identity=identity)


def check_unchanged(info: InputInfo) -> None:
    """Raise InputError saying what changed if the input is no longer the file `inspect` read."""
    if info.identity is None:
        return
    change = info.identity.change(FileIdentity.of(info.path))
    if change:
        raise InputError(
            f"the input {info.path} changed while the job ran: {change}. The finished samples are kept: put "
            "the original file back (same size and modification time) and submit the job again with --resume, "
            "or pass --overwrite to start over from the new file"
        )


def _inspect_parquet(path: Path, column: str) -> InputInfo:
    try:
        meta = pq.ParquetFile(path)
        schema = meta.schema_arrow
        rows = meta.metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: not a readable parquet file ({_short(exc)})") from exc
    if column not in schema.names:
        raise InputError(f"{path}: no column {column!r}; columns: {', '.join(schema.names)} (see --prompt-column)")
    return InputInfo(path, "parquet", rows, column, _kind(schema.field(column).type, path, column), tuple(schema.names))


def _kind(dtype: pa.DataType, path: Path, column: str) -> PromptKind:
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "text"
    if (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and pa.types.is_struct(dtype.value_type):
        names = {dtype.value_type.field(i).name for i in range(dtype.value_type.num_fields)}
        if {"role", "content"} <= names:
            return "chat"
    raise InputError(
        f"{path}: column {column!r} has type {dtype}; expected strings, or lists of {{role, content}} messages"
    )


def _inspect_jsonl(path: Path, column: str) -> InputInfo:
    rows, kind = 0, None
    types: dict[str, pa.DataType | None] = {}
    records: list[dict[str, Any]] = []
    try:
        with path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                record = _json_record(line, path, number)
                rows += 1
                value = record.get(column)
                if value is not None:
                    found = _value_kind(value, path, number, column)
                    kind = kind or found
                records.append(record)
                if len(records) >= BATCH_ROWS:
                    _settle_types(types, records)
                    records = []
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror})") from exc
    _settle_types(types, records)
    if rows and column not in types:
        raise InputError(f"{path}: no field {column!r}; fields: {', '.join(types)} (see --prompt-column)")
    return InputInfo(path, "jsonl", rows, column, kind or "text", tuple(types), tuple(types.values()))


def _settle_types(types: dict[str, pa.DataType | None], records: list[dict[str, Any]]) -> None:
    """Widen each field's type (None: JSON text) to cover these records as well."""
    # Fields known before but absent from every one of these records are null here: their type stays.
    for name in dict.fromkeys([*types, *(name for r in records for name in r)]):
        seen = _infer([r.get(name) for r in records])
        types[name] = _widen(types[name], seen) if name in types else seen


def _infer(values: list[Any]) -> pa.DataType | None:
    try:
        return pa.array(values).type
    except (pa.ArrowException, TypeError, ValueError):
        return None  # values that cannot share a type: JSON text


def _widen(old: pa.DataType | None, new: pa.DataType | None) -> pa.DataType | None:
    if old is None or new is None:
        return None
    try:
        merged = pa.unify_schemas([pa.schema([("v", old)]), pa.schema([("v", new)])], promote_options="permissive")
    except (pa.ArrowException, TypeError, ValueError):
        return None
    return merged.field("v").type


def _json_record(line: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise InputError(f"{path}:{number}: not JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise InputError(f"{path}:{number}: each line must be a JSON object")
    return record


def _value_kind(value: Any, path: Path, number: int, column: str) -> PromptKind:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return "chat"
    raise InputError(f"{path}:{number}: {column!r} must be a string or a list of {{role, content}} messages")


@dataclass(frozen=True)
class InputBatch:
    start: int  # the prompt_index of its first row
    columns: pa.RecordBatch  # the input's columns, carried through to the output
    prompts: list[Any]  # per row: a string, a list of {role, content} dicts, or None (a bad row)

    def __len__(self) -> int:
        return len(self.prompts)


def iter_batches(info: InputInfo, batch_rows: int = BATCH_ROWS) -> Iterator[InputBatch]:
    """The input in batches of at most `batch_rows` rows, in file order."""
    start = 0
    if info.format == "parquet":
        for batch in pq.ParquetFile(info.path).iter_batches(batch_size=batch_rows):
            values = batch.column(batch.schema.get_field_index(info.prompt_column)).to_pylist()
            yield InputBatch(start, batch, [_prompt(v) for v in values])
            start += batch.num_rows
        return
    records: list[dict[str, Any]] = []
    with info.path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                records.append(_json_record(line, info.path, number))
            if len(records) >= batch_rows:
                yield _jsonl_batch(start, records, info)
                start += len(records)
                records = []
    if records:
        yield _jsonl_batch(start, records, info)


def _jsonl_batch(start: int, records: list[dict[str, Any]], info: InputInfo) -> InputBatch:
    arrays = [
        _column([r.get(name) for r in records], dtype, info.path, name)
        for name, dtype in zip(info.columns, info.types, strict=True)
    ]
    prompts = [_prompt(r.get(info.prompt_column)) for r in records]
    return InputBatch(start, pa.RecordBatch.from_arrays(arrays, names=list(info.columns)), prompts)


def _column(values: list[Any], dtype: pa.DataType | None, path: Path, name: str) -> pa.Array:
    if dtype is None:  # values of several kinds: each one carried as JSON text
        return pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())
    try:
        return pa.array(values, type=dtype)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise InputError(f"{path}: field {name!r} changed type since the file was checked ({_short(exc)})") from exc


def _prompt(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(_is_message(m) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("role"), str) and isinstance(value.get("content"), str)


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200]
