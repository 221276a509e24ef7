"""`submit --shard K/N`: N jobs split one input, each every N-th prompt from the K-th; their rows keep the
prompt_index of the whole input, carry the input's columns, and, seeded, are the very samples the whole
input's job makes."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from daemonkit import Spawn, assert_short_error
from jobkit import FAST_SIM, job_daemon, launch, submit, wait_ended, write_prompts

PROMPTS, K, SHARDS = 50, 3, 3
JOB = ("-k", str(K), "--max-tokens", "16", "--seed", "7", "--temperature", "1", "--model", "m")
KEYS = ["prompt_index", "sample_index", "response", "id"]


def test_shards_make_the_whole_inputs_samples(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 2, *FAST_SIM)
    data = write_prompts(short_tmp / "prompts.parquet", PROMPTS, id=[f"row-{i}" for i in range(PROMPTS)])
    whole = submit(daemon, data, short_tmp / "whole.parquet", *JOB)
    shards = [submit(daemon, data, short_tmp / f"shard-{k}.parquet", *JOB, "--shard", f"{k}/{SHARDS}")
              for k in range(SHARDS)]  # fmt: skip
    for job_id in (whole, *shards):
        assert wait_ended(daemon, job_id)["state"] == "JOB_STATE_SUCCEEDED"
    tables = [pq.read_table(short_tmp / f"shard-{k}.parquet", columns=KEYS) for k in range(SHARDS)]
    for k, table in enumerate(tables):
        indexes = table.column("prompt_index").to_pylist()
        assert sorted(set(indexes)) == list(range(k, PROMPTS, SHARDS))
        assert len(indexes) == len(range(k, PROMPTS, SHARDS)) * K
        assert table.column("id").to_pylist() == [f"row-{i}" for i in indexes]  # the input's columns, joined
    joined = pa.concat_tables(tables).sort_by([("prompt_index", "ascending"), ("sample_index", "ascending")])
    assert joined.to_pylist() == pq.read_table(short_tmp / "whole.parquet", columns=KEYS).to_pylist()


def test_a_shard_out_of_range_is_a_usage_error(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    data = write_prompts(short_tmp / "prompts.parquet", 5)
    for shard, says in (("3/3", "K from 0 to N-1"), ("1/0", "N from 1"), ("a/b", "expected K/N")):
        done = daemon.ctl("submit", "-d", str(data), "-o", str(short_tmp / "o.parquet"), "--shard", shard)
        assert_short_error(done, 2, says)
    assert not (short_tmp / "o.parquet").exists()
