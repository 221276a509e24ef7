"""Watching a job: the last view a watcher gets is the ended one, even when the job ends while a view
is on its way to the watcher (as the gRPC layer sends it on)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from mvllm.jobs import JobRecord, JobSpec, JobState
from mvllmd.config import JobSettings
from mvllmd.fleet import Fleet
from mvllmd.jobs.manager import JobManager, _Job
from mvllmd.jobs.store import JobStore

SETTINGS = JobSettings(max_running=1, max_concurrent=8, endpoint_max_num_seqs=8, hang_timeout_s=120, stop_drain_s=1)


async def test_a_job_that_ends_while_its_view_is_on_its_way_is_watched_to_its_end(tmp_path: Path) -> None:
    # watch() reads the job's record only: no fleet is reached
    manager = JobManager(JobStore(tmp_path / "jobs.sqlite3"), cast(Fleet, None), SETTINGS)
    record = JobRecord("a1", JobSpec(tmp_path / "in.parquet", tmp_path / "out.parquet"), state=JobState.RUNNING)
    manager._jobs[record.id] = _Job(record)  # a job the manager runs, without running it
    watch = manager.watch(record.id)
    assert (await anext(watch)).record.state is JobState.RUNNING
    record.state = JobState.SUCCEEDED  # while the watcher sends that view on (mvllmd's RPC awaits the write)
    # One more view, the ended one. (Before: none. The watch saw the job ended after the running view,
    # and returned: `mvllmctl submit --wait` said "mvllmd stopped before job ... ended" in two CI runs.)
    assert [view.record.state async for view in watch] == [JobState.SUCCEEDED]
    await manager.close()
