"""Jobs that meet faults mid-way, through the real daemon: an instance killed, hung, answering 500s or
stopped; mvllmd itself killed or stopped and started again. Every job must still succeed with every
(prompt, sample) exactly once and no sample in error.

Each fault is struck when the job's samples_done has crossed a threshold (polled), on instances slow
enough (jobkit.SLOW_SIM) that the job is still far from its end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mvllm.v1 import job_pb2
from mvllmd.jobs.output import DoneMap, load_done, parts_dir

from daemonkit import MVLLMCTL, DaemonProcess, Spawn, instance_status
from jobkit import (
    FAST_SIM,
    SLOW_PROMPTS,
    SLOW_SIM,
    assert_each_pair_once,
    instance,
    job_daemon,
    launch,
    progress,
    submit,
    wait_ended,
    wait_samples,
    write_prompts,
)

K = 4
TOTAL = SLOW_PROMPTS * K
FAULT_AT = TOTAL // 8  # the fault strikes once this many samples are done


# A job with max_tokens of 128 or more (and no seed or stop strings) streams its requests, so that its
# tail can move samples (dispatch.py): its faults strike mid-stream. The simulator then makes short
# answers (median e^2, about 7 tokens), so that the job takes as long as one of 8 tokens.
STREAMED = ("--output-len-mu", "2")


def start_job(daemon: DaemonProcess, tmp: Path, streamed: bool = False) -> tuple[str, Path]:
    data, out = write_prompts(tmp / "in.parquet", SLOW_PROMPTS), tmp / "out.parquet"
    return submit(daemon, data, out, "-k", str(K), "--max-tokens", "128" if streamed else "8"), out


def assert_succeeded(daemon: DaemonProcess, job_id: str, out: Path) -> dict[str, object]:
    found = wait_ended(daemon, job_id)
    assert found["state"] == "JOB_STATE_SUCCEEDED", (found, daemon.stderr[-3000:])
    assert (found["samples_done"], found["errors"]) == (TOTAL, 0)
    assert_each_pair_once(pq.read_table(out), SLOW_PROMPTS, K)
    assert not out.with_name(out.name + ".parts").exists()
    return found


# --- instances -----------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
def test_an_instance_killed_mid_job(short_tmp: Path, spawn: Spawn, streamed: bool) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 2, *SLOW_SIM, *(STREAMED if streamed else ()))
    pid = instance(daemon, "m-0")["pid"]
    job_id, out = start_job(daemon, short_tmp, streamed)
    wait_samples(daemon, job_id, FAULT_AT)
    os.kill(pid, signal.SIGKILL)
    assert_succeeded(daemon, job_id, out)
    assert instance(daemon, "m-0")["restarts"] >= 1  # the kill did land


def test_an_instance_stopped_mid_job(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 2, *SLOW_SIM)
    job_id, out = start_job(daemon, short_tmp)
    wait_samples(daemon, job_id, FAULT_AT)
    assert daemon.ctl("stop", "m-0").returncode == 0
    found = assert_succeeded(daemon, job_id, out)
    assert [i["name"] for i in instance_status(daemon.ctl)] == ["m-1"]
    assert found["endpoints"]


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
def test_an_instance_that_hangs_mid_job(short_tmp: Path, spawn: Spawn, streamed: bool) -> None:
    # The job gives up on a server that finishes nothing for 1 s; the daemon restarts an instance that
    # makes no progress for 2 s (and it hangs again: each start answers a few requests, then none).
    daemon = job_daemon(spawn, short_tmp, "--job-hang-timeout", "1", "--hang-timeout", "2")
    lengths = STREAMED if streamed else ()
    launch(daemon, 1, *SLOW_SIM, *lengths)
    launch(daemon, 1, *SLOW_SIM, *lengths, "--hang-after-requests", "40", name="hangs")
    job_id, out = start_job(daemon, short_tmp, streamed)
    wait_samples(daemon, job_id, FAULT_AT)
    found = assert_succeeded(daemon, job_id, out)
    table = pq.read_table(out)
    hung_url = instance(daemon, "hangs-0")["url"]
    assert 0 < table.column("endpoint").to_pylist().count(hung_url) < TOTAL / 2  # it took part, then hung
    assert found["endpoints"]


def test_an_instance_found_unhealthy_leaves_the_job_at_once(short_tmp: Path, spawn: Spawn) -> None:
    # The job's own hang watch waits its default 120 s; the daemon finds the instance hung in about 2 s
    # (UNHEALTHY), and the job must leave it then, not 120 s later.
    daemon = job_daemon(spawn, short_tmp, "--hang-timeout", "2", "--max-restarts", "0")
    launch(daemon, 1, *SLOW_SIM)
    launch(daemon, 1, *SLOW_SIM, "--hang-after-requests", "40", name="hangs")
    job_id, out = start_job(daemon, short_tmp)
    wait_samples(daemon, job_id, FAULT_AT)
    found = wait_ended(daemon, job_id, timeout=60)  # far less than the job's own hang timeout
    assert found["state"] == "JOB_STATE_SUCCEEDED", (found, daemon.stderr[-3000:])
    assert_each_pair_once(pq.read_table(out), SLOW_PROMPTS, K)
    assert "hangs-0 left; its requests go elsewhere" in daemon.stderr


def test_an_instance_answering_500s(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 1, *FAST_SIM)  # the errors come from the start: no need to wait for a moment mid-job
    launch(daemon, 1, *FAST_SIM, "--error-rate", "1", "--error-status", "500", name="broken")
    job_id, out = start_job(daemon, short_tmp)
    assert_succeeded(daemon, job_id, out)
    table = pq.read_table(out)
    assert set(table.column("endpoint").to_pylist()) == {instance(daemon, "m-0")["url"]}


# --- the daemon ----------------------------------------------------------------------------------


def watch(daemon: DaemonProcess, job_id: str) -> subprocess.Popen[str]:
    watcher = subprocess.Popen([MVLLMCTL, "--address", daemon.address, "watch", job_id],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=daemon.env)  # fmt: skip
    assert watcher.stderr is not None
    assert f"job {job_id} " in watcher.stderr.readline()  # it follows the job (a line per state change)
    return watcher


def assert_watch_says_it_resumes(watcher: subprocess.Popen[str], job_id: str) -> None:
    _, watched = watcher.communicate(timeout=60)
    assert watcher.returncode == 1, watched
    # and why the watch ended: its stream was cut (the daemon killed), or the daemon ended it (stopping)
    assert re.search(rf"mvllmd stopped before job {job_id} ended( \(.*went away mid-stream.*\))?; it resumes "
                     "when mvllmd starts again", watched), watched  # fmt: skip


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
def test_mvllmd_killed_mid_job_resumes_it_by_itself(short_tmp: Path, spawn: Spawn, streamed: bool) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 2, *SLOW_SIM, *(STREAMED if streamed else ()))
    job_id, out = start_job(daemon, short_tmp, streamed)
    watcher = watch(daemon, job_id)
    wait_samples(daemon, job_id, FAULT_AT)
    reported = progress(daemon, job_id).samples_done
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    assert_watch_says_it_resumes(watcher, job_id)  # the connection was lost mid-stream: not "unreachable"
    assert not out.exists()
    # Every sample it had reported done survived the kill (in parts or the journal): none is asked again.
    assert load_done(parts_dir(out), DoneMap(SLOW_PROMPTS, K)) >= reported >= FAULT_AT

    again = spawn(daemon.argv[1:])  # the same state directory: the engines are adopted, the job resumed
    resumed = progress(again, job_id)
    assert resumed.state in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING), resumed.message
    assert resumed.spec.resume
    assert_succeeded(again, job_id, out)
    assert "resuming" in again.stderr


def test_mvllmd_stopped_mid_job_resumes_it_on_the_next_start(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 2, *SLOW_SIM)
    job_id, out = start_job(daemon, short_tmp)
    watcher = watch(daemon, job_id)
    wait_samples(daemon, job_id, FAULT_AT)
    before = progress(daemon, job_id)
    assert daemon.stop() == 0  # SIGTERM: requests in flight finish, the parts are kept
    assert_watch_says_it_resumes(watcher, job_id)
    assert not out.exists()
    # What was in flight at the stop was let finish and written: no request was cut off.
    assert load_done(parts_dir(out), DoneMap(SLOW_PROMPTS, K)) >= before.samples_done + before.inflight
    assert before.inflight > 0

    again = spawn(daemon.argv[1:])
    assert_succeeded(again, job_id, out)
