"""Job records in SQLite: what a restart (or a kill -9) finds again, this release's and the previous one's."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mvllm.jobs import JobRecord, JobSpec, JobState, OnError, Policy, Sampling
from mvllmd.jobs.store import JobStore


def job_spec(tmp: Path, **kw: object) -> JobSpec:
    base: dict[str, object] = {
        "input_path": tmp / "in.parquet",
        "output_path": tmp / "out.parquet",
        "model": "m",
        "sampling": Sampling(max_tokens=7, stop=("\n\n",), seed=3, extra_body={"top_k": 20}),
        "num_samples": 4,
        "endpoints": ("http://10.0.0.5:8000",),
    }
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def test_records_round_trip_in_submission_order(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    first = JobRecord("a1", job_spec(tmp_path), samples_total=40)
    second = JobRecord("b2", job_spec(tmp_path, policy=Policy.ROUND_ROBIN, on_error=OnError.FAIL))
    store.save(first)
    store.save(second)
    first.state, first.samples_done, first.message = JobState.RUNNING, 12, "going"
    store.save(first)  # an update keeps its place in the order
    store.close()

    again = JobStore(tmp_path / "jobs.sqlite3").load()
    assert [r.id for r in again] == ["a1", "b2"]
    assert again[0] == first
    assert again[1].spec == second.spec
    assert (tmp_path / "jobs.sqlite3").stat().st_mode & 0o777 == 0o600  # prompts' paths are nobody else's


def test_delete(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.save(JobRecord("a1", job_spec(tmp_path)))
    store.delete("a1")
    assert store.load() == []


# A row as the previous release wrote it: its `request` column held JobRequest.to_json(), the model
# inside the sampling parameters.
PREVIOUS_REQUEST = (
    '{"input_path": "/data/in.parquet", "output_path": "/data/out.parquet", "sampling": {"model": "m", '
    '"max_tokens": 7, "temperature": 1.0, "top_p": 1.0, "stop": ["\\n\\n"], "seed": 3, "logprobs": null, '
    '"return_token_ids": false, "extra_body": {"top_k": 20}}, "num_samples": 4, "prompt_column": "prompt", '
    '"policy": "round-robin", "max_concurrent": 0, "endpoints": ["http://10.0.0.5:8000"], '
    '"wait_for_instances_s": 30.0, "on_error": "fail", "resume": true, "overwrite": false, '
    '"endpoint_api_key": "sk-secret", "hedge": false}'
)


def test_a_state_directory_of_the_previous_release_loads(tmp_path: Path) -> None:
    JobStore(tmp_path / "jobs.sqlite3").close()  # the same schema
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("old1", 1, PREVIOUS_REQUEST, "running", 40, 12, 1, 300, "", 1.5e9, 1.5e9 + 1, 0.0),
        )
    db.close()
    (record,) = JobStore(tmp_path / "jobs.sqlite3").load()
    assert record == JobRecord(
        id="old1",
        spec=JobSpec(
            input_path=Path("/data/in.parquet"),
            output_path=Path("/data/out.parquet"),
            num_samples=4,
            model="m",
            sampling=Sampling(max_tokens=7, stop=("\n\n",), seed=3, extra_body={"top_k": 20}),
            policy=Policy.ROUND_ROBIN,
            endpoints=("http://10.0.0.5:8000",),
            wait_for_instances_s=30.0,
            on_error=OnError.FAIL,
            resume=True,
            endpoint_api_key="sk-secret",
            hedge=False,
        ),
        state=JobState.RUNNING,
        samples_total=40,
        samples_done=12,
        errors=1,
        completion_tokens=300,
        created_at=1.5e9,
        started_at=1.5e9 + 1,
    )
