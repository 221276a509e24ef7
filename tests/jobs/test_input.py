"""The input file: formats, the prompt column and its types, batches, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvllmd.jobs.input import InputError, inspect, iter_batches


def test_parquet_text_prompts_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(10)], "x": list(range(10))}), path)
    info = inspect(path)
    assert (info.num_rows, info.prompt_kind, info.columns) == (10, "text", ("prompt", "x"))
    batches = list(iter_batches(info, batch_rows=4))
    assert [(b.start, len(b)) for b in batches] == [(0, 4), (4, 4), (8, 2)]
    assert batches[2].prompts == ["p8", "p9"]


def test_parquet_chat_prompts(tmp_path: Path) -> None:
    path = tmp_path / "chat.parquet"
    messages = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
    ]
    pq.write_table(pa.table({"conversation": messages}), path)
    info = inspect(path, prompt_column="conversation")
    assert info.prompt_kind == "chat"
    assert next(iter_batches(info)).prompts == messages


def test_a_null_prompt_is_a_bad_row_not_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a", None, "c"]}), path)
    assert next(iter_batches(inspect(path))).prompts == ["a", None, "c"]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a", "n": 1}\n\n{"prompt": "b", "n": 2, "extra": [1]}\n')
    info = inspect(path)
    assert (info.num_rows, info.prompt_kind, info.columns) == (2, "text", ("prompt", "n", "extra"))
    (batch,) = iter_batches(info)
    assert batch.prompts == ["a", "b"]
    assert batch.columns.column("extra").to_pylist() == [None, [1]]


def test_jsonl_fields_keep_one_type_across_batches(tmp_path: Path) -> None:
    # Batches of 4 rows: a field that first appears in a later batch, ints that become floats, and a
    # field whose values cannot share a type; every batch must have the same columns and types.
    lines = [{"prompt": f"p{i}", "n": i} for i in range(6)]
    lines += [{"prompt": "p6", "n": 6.5, "late": "x", "mixed": 1}, {"prompt": "p7", "n": 7, "mixed": "one"}]
    lines[1]["mixed"] = [1]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    info = inspect(path)
    batches = list(iter_batches(info, batch_rows=4))
    assert len(batches) == 2
    assert batches[0].columns.schema == batches[1].columns.schema
    assert batches[0].columns.schema.field("n").type == pa.float64()
    assert batches[0].columns.column("late").to_pylist() == [None] * 4
    assert batches[1].columns.column("late").to_pylist() == [None, None, "x", None]
    assert batches[1].columns.column("mixed").to_pylist() == [None, None, "1", '"one"']  # as JSON text


def test_jsonl_every_prompt_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f'{{"prompt": "p{i}"}}\n' for i in range(5000)) + '{"prompt": {"text": "x"}}\n')
    with pytest.raises(InputError, match=r"in.jsonl:5001: 'prompt' must be a string or a list"):
        inspect(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.parquet", None, "no such file"),
        ("corrupt.parquet", b"PAR1 this is not parquet", "not a readable parquet file"),
        ("data.csv", b"prompt\nx\n", "unknown input format '.csv'"),
        ("bad.jsonl", b'{"prompt": "a"}\n{not json\n', "bad.jsonl:2: not JSON"),
        ("list.jsonl", b'["a"]\n', "each line must be a JSON object"),
        ("wrongtype.jsonl", b'{"prompt": 42}\n', "'prompt' must be a string or a list of {role, content}"),
        ("nocolumn.jsonl", b'{"text": "a"}\n', "no field 'prompt'; fields: text"),
    ],
)
def test_refusals(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as excinfo:
        inspect(path)
    assert message in str(excinfo.value)


def test_parquet_column_missing_or_of_the_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a"], "prompt_ids": [1]}), path)
    with pytest.raises(InputError, match="no column 'prompt'; columns: text, prompt_ids"):
        inspect(path)
    with pytest.raises(InputError, match="column 'prompt_ids' has type int64; expected strings"):
        inspect(path, prompt_column="prompt_ids")


def test_a_directory_is_not_an_input(tmp_path: Path) -> None:
    folder = tmp_path / "dir.parquet"
    folder.mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        inspect(folder)
