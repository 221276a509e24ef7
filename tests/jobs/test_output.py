"""Output parts and their assembly: sorted, each sample once, input columns joined, atomic."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvllm.jobs import Sample
from mvllmd.jobs import output
from mvllmd.jobs.input import inspect
from mvllmd.jobs.output import DoneMap, OutputError, PartWriter, assemble, load_done, parts_dir, result_schema


def sample(p: int, s: int, error: str | None = None) -> Sample:
    return Sample(p, s, None if error else f"r{p}.{s}", "stop", 3, 5, "http://x", 0.1, None, error)


def write_input(tmp: Path, n: int) -> Path:
    path = tmp / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(n)], "response": [f"gold{i}" for i in range(n)],
                             "id": list(range(100, 100 + n))}), path)  # fmt: skip
    return path


def test_done_map() -> None:
    done = DoneMap(1000, 8)
    assert done.mark(999, 7) and not done.mark(999, 7)
    assert done.is_done(999, 7) and not done.is_done(999, 6)
    assert done.count == 1
    for s in range(8):
        done.mark(3, s)
    assert done.prompt_done(3) and not done.prompt_done(4)


@pytest.mark.parametrize("fan_in", [32, 2])  # one pass, and several passes of merged runs
def test_parts_assemble_sorted_once_with_input_columns(
    tmp_path: Path, fan_in: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(output, "MERGE_FAN_IN", fan_in)
    monkeypatch.setattr(output, "WINDOW_ROWS", 64)
    n, k = 500, 3
    source = inspect(write_input(tmp_path, n))
    out = tmp_path / "out.parquet"
    schema = result_schema(logprobs=False, token_ids=False)
    writer = PartWriter(parts_dir(out), schema, flush_rows=97)
    keys = [(p, s) for p in range(n) for s in range(k)]
    random.Random(1).shuffle(keys)
    for p, s in keys + keys[:40]:  # 40 duplicates, as hedged requests can give
        writer.add([sample(p, s, error="too long" if p == 7 else None)])
    writer.close()
    done = DoneMap(n, k)
    assert load_done(parts_dir(out), done) == n * k
    rows = assemble(parts_dir(out), out, source, schema, metadata={"model": "m"}, expected_rows=n * k)
    assert rows == n * k
    table = pq.read_table(out)
    assert table.column("prompt_index").to_pylist() == [p for p in range(n) for _ in range(k)]
    assert table.column("sample_index").to_pylist() == list(range(k)) * n
    assert table.column("input_response").to_pylist()[:3] == ["gold0"] * 3  # renamed: it collides
    assert table.column("prompt").to_pylist()[-1] == f"q{n - 1}"
    assert table.column("id").to_pylist()[k * 10] == 110
    assert table.column("error").to_pylist()[7 * k] == "too long"
    assert table.schema.metadata == {b"model": b"m"}
    assert not parts_dir(out).exists()


def test_assembly_refuses_a_short_output_and_keeps_the_parts(tmp_path: Path) -> None:
    source = inspect(write_input(tmp_path, 10))
    out = tmp_path / "out.parquet"
    schema = result_schema(False, False)
    writer = PartWriter(parts_dir(out), schema)
    for p in range(9):
        writer.add([sample(p, 0)])
    writer.close()
    with pytest.raises(OutputError, match="assembled 9 rows where 10 were expected"):
        assemble(parts_dir(out), out, source, schema, metadata={}, expected_rows=10)
    assert not out.exists()
    assert list(parts_dir(out).glob("part-*.parquet"))
    assert not list(tmp_path.glob(".out.parquet.tmp"))


def test_jsonl_input_with_chat_prompts(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = [{"prompt": [{"role": "user", "content": f"hi {i}"}], "tag": i % 2 == 0} for i in range(5)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    source = inspect(path)
    assert (source.num_rows, source.prompt_kind) == (5, "chat")
    out = tmp_path / "out.parquet"
    schema = result_schema(False, True)
    writer = PartWriter(parts_dir(out), schema)
    for p in reversed(range(5)):
        writer.add([Sample(p, 0, "x", "length", 1, 1, "e", 0.0, 42, None, token_ids=[1, 2])])
    writer.close()
    assemble(parts_dir(out), out, source, schema, metadata={}, expected_rows=5)
    table = pq.read_table(out)
    assert table.column("tag").to_pylist() == [True, False, True, False, True]
    assert table.column("token_ids").to_pylist()[0] == [1, 2]
    assert table.column("seed").to_pylist() == [42] * 5


def test_a_slow_job_writes_parts_by_age_not_only_by_count(tmp_path: Path) -> None:
    by_count = PartWriter(tmp_path / "a.parts", result_schema(False, False), flush_rows=1000, flush_age_s=3600)
    by_count.add([sample(0, 0)])
    assert (by_count.pending, list((tmp_path / "a.parts").glob("part-*"))) == (1, [])  # neither 1,000 rows nor an hour
    by_age = PartWriter(tmp_path / "b.parts", result_schema(False, False), flush_rows=1000, flush_age_s=0)
    by_age.add([sample(1, 0)])
    assert by_age.pending == 0 and len(list((tmp_path / "b.parts").glob("part-*"))) == 1  # old enough: on disk


def test_a_finished_sample_outlives_the_process_through_the_journal(tmp_path: Path) -> None:
    parts, schema = tmp_path / "out.parquet.parts", result_schema(True, True)
    writer = PartWriter(parts, schema, flush_rows=1000, flush_age_s=3600)
    writer.add([sample(0, 0), sample(2, 1, error="too long")])
    writer.add([Sample(1, 0, "ünïcode\n", "length", 4, 2, "e", 0.25, 7, None, logprobs=[-0.5, -1.0], token_ids=[5, 6])])
    assert writer.pending == 3 and not list(parts.glob("part-*"))
    # The process dies here (nothing more is called on the writer), in the middle of its next write:
    with (parts / output.JOURNAL).open("ab") as journal:
        journal.write(b'[3, 0, "cut sh')
    done = DoneMap(4, 2)
    assert load_done(parts, done) == 3  # what the journal holds is done; the cut line is not
    assert not done.is_done(3, 0)
    again = PartWriter(parts, schema)  # a restart: the journal becomes a part, and empties
    assert again.pending == 0 and (parts / output.JOURNAL).stat().st_size == 0
    (part,) = parts.glob("part-*.parquet")
    table = pq.read_table(part)
    assert table.column("prompt_index").to_pylist() == [0, 1, 2]
    assert table.column("response").to_pylist()[1] == "ünïcode\n"
    assert table.column("logprobs").to_pylist()[1] == [-0.5, -1.0]
    assert table.column("error").to_pylist()[2] == "too long"
    again.close()
    assert load_done(parts, DoneMap(4, 2)) == 3


def test_weight_versions_are_columns_and_a_part_from_before_them_reads_as_null(tmp_path: Path) -> None:
    source = inspect(write_input(tmp_path, 2))
    out = tmp_path / "out.parquet"
    schema = result_schema(False, False)
    parts = parts_dir(out)
    parts.mkdir()
    # A part written by a release without the weight columns (a job resumed across an upgrade).
    old = pa.schema([f for f in schema if not f.name.startswith("weight_")])
    row = {name: getattr(sample(0, 0), name) for name in old.names}
    pq.write_table(pa.Table.from_pylist([row], schema=old), parts / "part-000001.parquet")
    writer = PartWriter(parts, schema)
    writer.add([Sample(1, 0, "r", "stop", 3, 5, "http://x", 0.1, None, None, weight_versions=["v1", "v2"])])
    writer.close()
    assemble(parts, out, source, schema, metadata={}, expected_rows=2)
    table = pq.read_table(out)
    assert table.column("weight_version").to_pylist() == [None, "v2"]
    assert table.column("weight_versions").to_pylist() == [None, ["v1", "v2"]]
