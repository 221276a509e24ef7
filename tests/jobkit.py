"""Helpers for the job tests that drive a real mvllmd process with mvllmctl and mvllm-sim instances.

A job daemon runs the built-in process supervisor over simulated GPUs, so `mvllmctl launch --engine sim`
starts real mvllm-sim processes that the jobs send their requests to. Jobs are read back through
`mvllmctl job ID --json`, never from the daemon's insides.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq

from mvllm.v1 import job_pb2, job_pb2_grpc

from daemonkit import MVLLMCTL, DaemonProcess, Spawn, instance_status

ENDED = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")
FAST_SIM = ("--time-scale", "0.001")  # answers at once, or nearly
# 400 prompts x 4 samples take several seconds, mostly asleep: room to act on a job mid-way, even on a
# loaded machine where each mvllmctl call takes a second or more.
SLOW_SIM = ("--time-scale", "1", "--max-num-seqs", "16")
SLOW_PROMPTS = 400
JOB_TIMEOUT_S = 90.0


def daemon_args(tmp: Path, *extra: str, name: str = "j") -> list[str]:
    """mvllmd with the process supervisor and 4 simulated GPUs, on a socket and state dir under `tmp`."""
    return ["--listen", f"unix:{tmp}/{name}.sock", "--state-dir", str(tmp / f"{name}-state"), "--sim-gpus", "4",
            "--unit-manager", "process", "--probe-interval", "0.2",
            "--vllm-python", str(tmp / "no-such-venv" / "bin" / "python"), *extra]  # fmt: skip


def job_daemon(spawn: Spawn, tmp: Path, *extra: str, name: str = "j") -> DaemonProcess:
    return spawn(daemon_args(tmp, *extra, name=name))


def launch(daemon: DaemonProcess, n: int = 2, *engine_args: str, name: str = "", model: str = "m") -> list[str]:
    """Launch n sim instances of `model` (engine_args: SLOW_SIM, FAST_SIM, faults); return their names."""
    options = ["--name", name] if name else []
    if "--max-num-seqs" in engine_args:  # the daemon's option, so that jobs know each server's batch
        at = engine_args.index("--max-num-seqs")
        options += engine_args[at : at + 2]
        engine_args = engine_args[:at] + engine_args[at + 2 :]
    done = daemon.ctl("launch", model, "--engine", "sim", "-n", str(n), *options, "--", *engine_args)
    assert done.returncode == 0, done.stderr
    prefix = name or model
    return [f"{prefix}-{i}" for i in range(n)]


def instance(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    (found,) = [i for i in instance_status(daemon.ctl) if i["name"] == name]
    return found


# --- files ---------------------------------------------------------------------------------------


def write_prompts(path: Path, count: int, **columns: list[Any]) -> Path:
    """A parquet (or JSONL, by extension) input: a `prompt` column of distinct strings, and `columns`."""
    data: dict[str, list[Any]] = {"prompt": [f"prompt {i}: tell me about the number {i}" for i in range(count)]}
    data.update(columns)
    if path.suffix == ".jsonl":
        rows = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.table(data), path)
    return path


def snapshot(path: Path) -> tuple[bytes, int]:
    """A file's bytes and mtime: proof that a job left its input alone."""
    return path.read_bytes(), path.stat().st_mtime_ns


def assert_each_pair_once(table: pa.Table, prompts: int, k: int) -> None:
    """Exactly prompts x k rows, sorted by (prompt_index, sample_index), each pair once, none failed."""
    keys = list(zip(table.column("prompt_index").to_pylist(), table.column("sample_index").to_pylist(), strict=True))
    assert len(keys) == prompts * k
    assert keys == [(p, s) for p in range(prompts) for s in range(k)]
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    assert errors == [], errors[:5]
    assert table.column("response").null_count == 0


def leftovers(folder: Path) -> list[str]:
    """What a job left in a folder besides its input: no temp files, probes or parts when it is done."""
    return sorted(p.name for p in folder.iterdir())


# --- jobs ----------------------------------------------------------------------------------------


def submit(daemon: DaemonProcess, data: Path, out: Path, *args: str) -> str:
    """Submit without waiting; return the job's id."""
    done = daemon.ctl("submit", "-d", str(data), "-o", str(out), *args)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert len(job_id) == 12, done.stdout
    return job_id


def job(daemon: DaemonProcess, job_id: str) -> dict[str, Any]:
    """`mvllmctl job ID --json`, with the int64 counts (strings in proto JSON) as ints."""
    done = daemon.ctl("job", job_id, "--json")
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    for key in ("samples_total", "samples_done", "errors", "completion_tokens", "inflight"):
        found[key] = int(found[key])  # every field is printed, defaults too
    return found


def jobs(daemon: DaemonProcess) -> list[dict[str, Any]]:
    done = daemon.ctl("jobs", "--json")
    assert done.returncode == 0, done.stderr
    listed: list[dict[str, Any]] = json.loads(done.stdout).get("jobs", [])
    return listed


def progress(daemon: DaemonProcess, job_id: str) -> job_pb2.Job:
    """The job as GetJob returns it, without starting a process: cheap enough to poll at 10 Hz. (30 s: this
    machine stalls for seconds at a time while a vLLM engine runs.)"""
    with grpc.insecure_channel(daemon.address) as channel:
        stub = job_pb2_grpc.JobServiceStub(channel)
        found: job_pb2.Job = stub.GetJob(job_pb2.GetJobRequest(id=job_id), timeout=30).job
    return found


def job_count(daemon: DaemonProcess) -> int:
    with grpc.insecure_channel(daemon.address) as channel:
        listed = job_pb2_grpc.JobServiceStub(channel).ListJobs(job_pb2.ListJobsRequest(), timeout=10)
    return len(listed.jobs)


def wait_job(
    daemon: DaemonProcess, job_id: str, predicate: Callable[[job_pb2.Job], bool], timeout: float = JOB_TIMEOUT_S
) -> job_pb2.Job:
    """Poll the job until `predicate` holds; fail (with the job and the daemon's log) if it ends first."""
    deadline = time.monotonic() + timeout
    while True:
        found = progress(daemon, job_id)
        if predicate(found):
            return found
        if job_pb2.JobState.Name(found.state) in ENDED:
            raise AssertionError(f"job ended before the condition held: {found}\n{daemon.stderr[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s: {found}\n{daemon.stderr[-3000:]}")
        time.sleep(0.1)


def wait_samples(daemon: DaemonProcess, job_id: str, at_least: int) -> job_pb2.Job:
    """Wait until the job has done `at_least` samples, and is still running (so that a fault hits it mid-way)."""
    found = wait_job(daemon, job_id, lambda j: j.samples_done >= at_least)
    assert found.samples_done < found.samples_total, "the job finished before the fault: make it slower"
    return found


def wait_ended(daemon: DaemonProcess, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    """Wait for the job to end; return it as `mvllmctl job ID --json` shows it."""
    deadline = time.monotonic() + timeout
    while job_pb2.JobState.Name((found := progress(daemon, job_id)).state) not in ENDED:
        assert time.monotonic() < deadline, f"job did not end in {timeout}s: {found}\n{daemon.stderr[-3000:]}"
        time.sleep(0.2)
    return job(daemon, job_id)


def run_ctl(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """mvllmctl without a daemon's address: the environment (MVLLM_ADDRESS, XDG_RUNTIME_DIR) decides."""
    return subprocess.run([MVLLMCTL, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False)
