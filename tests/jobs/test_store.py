"""Job records in SQLite: what a restart (or a kill -9) finds again."""

from __future__ import annotations

from pathlib import Path

from mvllmd.jobs.record import JobRecord, JobRequest, JobState
from mvllmd.jobs.requests import Sampling
from mvllmd.jobs.store import JobStore


def request(tmp: Path, **kw: object) -> JobRequest:
    base: dict[str, object] = {
        "input_path": tmp / "in.parquet",
        "output_path": tmp / "out.parquet",
        "sampling": Sampling(model="m", max_tokens=7, stop=("\n\n",), seed=3, extra_body={"top_k": 20}),
        "num_samples": 4,
        "endpoints": ("http://10.0.0.5:8000",),
    }
    base.update(kw)
    return JobRequest(**base)  # type: ignore[arg-type]


def test_records_round_trip_in_submission_order(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    first = JobRecord("a1", request(tmp_path), samples_total=40)
    second = JobRecord("b2", request(tmp_path, policy="round-robin", on_error="fail"))
    store.save(first)
    store.save(second)
    first.state, first.samples_done, first.message = JobState.RUNNING, 12, "going"
    store.save(first)  # an update keeps its place in the order
    store.close()

    again = JobStore(tmp_path / "jobs.sqlite3").load()
    assert [r.id for r in again] == ["a1", "b2"]
    assert again[0] == first
    assert again[1].request == second.request
    assert (tmp_path / "jobs.sqlite3").stat().st_mode & 0o777 == 0o600  # prompts' paths are nobody else's


def test_delete(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.save(JobRecord("a1", request(tmp_path)))
    store.delete("a1")
    assert store.load() == []
