"""Faults of the machine mvllmd runs on, through the real daemon: the output's file system full, the
state directory full, the input changed under a job, mvllmd killed or stopped during the final
assembly, a journal line cut by a kill, the parts directory removed. Each test checks the job's state,
its message and mvllmctl's exit code, and that every (prompt, sample) is in the output exactly once
after the recovery the README documents.

mvllmd runs in a private mount namespace (smallfs.MountNamespace) where each test mounts the small
tmpfs it needs, so that "no space left on device" is the kernel's own answer; the test reads the files
there through /proc/ANCHOR/root (`ns.inside`). Its mvllm-sim instances are started by mvllmd, in the
same namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mvllmd.jobs.output import parts_dir

from daemonkit import DaemonProcess, Spawn, assert_short_error
from jobkit import (
    FAST_SIM,
    SLOW_PROMPTS,
    SLOW_SIM,
    assert_each_pair_once,
    daemon_args,
    job,
    jobs,
    launch,
    leftovers,
    submit,
    wait_ended,
    wait_samples,
    write_prompts,
)
from simkit import SimProcess
from smallfs import MountNamespace, available

K = 4
TOTAL = SLOW_PROMPTS * K
FAULT_AT = TOTAL // 8  # the fault strikes once this many samples are done
ENDS_WITHIN_S = 60.0  # a job that meets a fault ends within this long (the bound)
JOB = ("-k", str(K), "--max-tokens", "8")


@pytest.fixture(scope="module")
def ns() -> Iterator[MountNamespace]:
    reason = available()
    if reason is not None:  # never a silent skip: CI must prove this on every run
        pytest.fail(f"cannot make a private mount namespace here: {reason}")
    with MountNamespace() as namespace:
        yield namespace


def start(spawn: Spawn, ns: MountNamespace, tmp: Path, again: DaemonProcess | None = None) -> DaemonProcess:
    """mvllmd (process supervisor, simulated GPUs) inside the namespace; `again`: restart that one."""
    args = again.argv[1:] if again is not None else daemon_args(tmp)
    return spawn(args, prefix=ns.command([]))


def slow_job(daemon: DaemonProcess, tmp: Path, out: Path) -> tuple[str, Path]:
    """A job on two slow instances (several seconds long), waited for until it is an eighth done."""
    launch(daemon, 2, *SLOW_SIM)
    data = write_prompts(tmp / "in.parquet", SLOW_PROMPTS)
    job_id = submit(daemon, data, out, *JOB)
    wait_samples(daemon, job_id, FAULT_AT)
    return job_id, data


def watch_to_the_end(daemon: DaemonProcess, job_id: str, what: str) -> dict[str, object]:
    """`mvllmctl watch` until the job ends: it must end within ENDS_WITHIN_S, FAILED, exit 1."""
    started = time.monotonic()
    watched = daemon.ctl("watch", job_id, timeout=ENDS_WITHIN_S + 30)
    took = time.monotonic() - started
    print(f"{what}: the job ended {took:.1f} s after the fault")
    assert took < ENDS_WITHIN_S, took
    assert watched.returncode == 1, (watched.returncode, watched.stderr)
    found = job(daemon, job_id)
    assert found["state"] == "JOB_STATE_FAILED", found
    assert "internal error" not in found["message"]
    return found


def resume(daemon: DaemonProcess, data: Path, out: Path, *extra: str) -> None:
    done = daemon.ctl("submit", "-d", str(data), "-o", str(out), *JOB, *extra, "--resume", "--wait", timeout=120)
    assert done.returncode == 0, (done.stderr, daemon.stderr[-3000:])


# --- full file systems ---------------------------------------------------------------------------


def test_the_output_file_system_fills_mid_job(short_tmp: Path, spawn: Spawn, ns: MountNamespace) -> None:
    folder = short_tmp / "out"
    ns.mount_tmpfs(folder, "64M")
    daemon = start(spawn, ns, short_tmp)
    out = folder / "out.parquet"
    job_id, data = slow_job(daemon, short_tmp, out)
    filler = ns.fill(folder)

    found = watch_to_the_end(daemon, job_id, "output full")
    assert found["message"].startswith("no space left on device writing "), found["message"]
    assert str(parts_dir(out)) in found["message"]
    assert "submit the job again with --resume" in found["message"]
    assert 0 < found["samples_done"] < TOTAL
    parts = ns.inside(parts_dir(out))
    assert not [p.name for p in parts.iterdir() if p.name.endswith(".tmp")]  # no partial part keeps the room
    assert not ns.inside(out).exists()

    filler.unlink()  # space freed
    resume(daemon, data, out)
    assert_each_pair_once(pq.read_table(ns.inside(out)), SLOW_PROMPTS, K)
    assert leftovers(ns.inside(folder)) == ["out.parquet"]


def test_the_output_file_system_too_small_for_the_assembly(short_tmp: Path, spawn: Spawn, ns: MountNamespace) -> None:
    """The parts fit, OUT does not (the input's columns are carried into it): the job fails naming OUT;
    once there is room, --resume assembles from the parts without asking any server."""
    folder = short_tmp / "out"
    ns.mount_tmpfs(folder, "4M")
    daemon = start(spawn, ns, short_tmp)
    launch(daemon, 2, *FAST_SIM)
    prompts = 200
    docs = [os.urandom(16384).hex() for _ in range(prompts)]  # 6.4 MB of OUT that the parts do not hold
    data = write_prompts(short_tmp / "in.parquet", prompts, doc=docs)
    out = folder / "out.parquet"
    job_id = submit(daemon, data, out, *JOB)

    found = watch_to_the_end(daemon, job_id, "output too small to assemble")
    assert found["message"].startswith(f"no space left on device assembling {out}; "), found["message"]
    assert found["samples_done"] == prompts * K
    assert sorted(leftovers(ns.inside(folder))) == ["out.parquet.parts"]  # no temp file keeps the room

    ns.resize(folder, "64M")
    done = daemon.ctl("stop", "--all")  # no server left to ask: the parts hold every sample
    assert done.returncode == 0, done.stderr
    resume(daemon, data, out, "--model", "m", "--wait-for-instances", "60")
    table = pq.read_table(ns.inside(out))
    assert_each_pair_once(table, prompts, K)
    assert table.column("doc").to_pylist() == [docs[i] for i in table.column("prompt_index").to_pylist()]


def test_the_state_directory_full(short_tmp: Path, spawn: Spawn, ns: MountNamespace) -> None:
    state = short_tmp / "j-state"  # daemon_args' state directory
    ns.mount_tmpfs(state, "16M")
    daemon = start(spawn, ns, short_tmp)

    # Full while a job runs: its records cannot be saved; it finishes all the same, and says so once.
    out = short_tmp / "first.parquet"
    job_id, data = slow_job(daemon, short_tmp, out)
    filler = ns.fill(state)
    found = wait_ended(daemon, job_id)
    assert found["state"] == "JOB_STATE_SUCCEEDED", (found, daemon.stderr[-3000:])
    assert_each_pair_once(pq.read_table(out), SLOW_PROMPTS, K)
    assert daemon.stderr.count(f"job {job_id}: its record cannot be saved") == 1, daemon.stderr[-3000:]

    # Full at submit: a clear error naming the directory, exit 4, and no job.
    second = short_tmp / "second.parquet"
    refused = daemon.ctl("submit", "-d", str(data), "-o", str(second), *JOB, "--wait")
    assert_short_error(refused, 4, f"the state directory {state} is full", "no job was created")
    time.sleep(1.0)  # a job created by mistake would have started by now
    assert [j["id"] for j in jobs(daemon)] == [job_id]
    assert not second.exists() and not parts_dir(second).exists()
    assert daemon.ctl("status").returncode == 0  # still serving

    filler.unlink()
    done = daemon.ctl("submit", "-d", str(data), "-o", str(second), *JOB, "--wait", timeout=120)
    assert done.returncode == 0, done.stderr
    assert_each_pair_once(pq.read_table(second), SLOW_PROMPTS, K)


# --- the input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["truncated", "replaced"])
def test_the_input_changed_mid_job(short_tmp: Path, spawn: Spawn, ns: MountNamespace, change: str) -> None:
    daemon = start(spawn, ns, short_tmp)
    out = short_tmp / "out.parquet"
    job_id, data = slow_job(daemon, short_tmp, out)
    original, stat = data.read_bytes(), data.stat()
    if change == "truncated":
        os.truncate(data, len(original) // 2)
        what = f"its size went from {len(original):,} to {len(original) // 2:,} bytes"
    else:  # another file, of the very same size, renamed over it (as `mv` or an editor's save does)
        other = short_tmp / "other.parquet"
        other.write_bytes(original)
        os.replace(other, data)
        what = "another file was put in its place"

    found = watch_to_the_end(daemon, job_id, f"input {change}")
    assert found["message"].startswith(f"the input {data} changed while the job ran: {what}."), found["message"]
    assert "put the original file back" in found["message"]
    assert not out.exists()

    data.write_bytes(original)  # the original back, with its time, as the message says
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    resume(daemon, data, out)
    assert_each_pair_once(pq.read_table(out), SLOW_PROMPTS, K)


# --- mvllmd stopped while it assembles -----------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_mvllmd_stopped_during_the_final_assembly(
    short_tmp: Path, spawn: Spawn, ns: MountNamespace, sig: signal.Signals
) -> None:
    folder = short_tmp / "out"
    ns.mount_tmpfs(folder, "1G")
    sim = SimProcess(*FAST_SIM)  # a server the test owns: stopped before the restart
    try:
        sim.wait_listening()
        daemon = start(spawn, ns, short_tmp)
        prompts = 1000  # with a 32 KB column carried through, the assembly takes long enough to be hit
        docs = [os.urandom(16384).hex() for _ in range(prompts)]
        data = write_prompts(short_tmp / "in.parquet", prompts, doc=docs)
        out = folder / "out.parquet"
        job_id = submit(daemon, data, out, "-k", "2", "--max-tokens", "8", "--endpoints", sim.url)
        assembling = ns.inside(folder) / f".{out.name}.tmp"
        deadline = time.monotonic() + 120
        while not assembling.exists():
            assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.stderr[-3000:]
            time.sleep(0.001)
        daemon.proc.send_signal(sig)
        daemon.proc.wait(120)
    finally:
        sim.stop()  # from here on no server can be asked for anything

    if sig == signal.SIGKILL:
        assert not ns.inside(out).exists()  # never half-written: the parts are all there is
        assert ns.inside(parts_dir(out)).is_dir()
    else:  # SIGTERM: mvllmd finishes the assembly it began, then stops (within the unit's TimeoutStopSec)
        assert "job output" in daemon.stderr, daemon.stderr[-3000:]
        assert_each_pair_once(pq.read_table(ns.inside(out)), prompts, 2)
    again = start(spawn, ns, short_tmp, again=daemon)
    found = wait_ended(again, job_id)
    assert found["state"] == "JOB_STATE_SUCCEEDED", (found, again.stderr[-3000:])
    table = pq.read_table(ns.inside(out))
    assert_each_pair_once(table, prompts, 2)
    assert table.column("doc").to_pylist() == [docs[i] for i in table.column("prompt_index").to_pylist()]
    assert leftovers(ns.inside(folder)) == ["out.parquet"]


# --- the journal and the parts ---------------------------------------------------------------------


def test_a_journal_line_torn_by_a_kill(short_tmp: Path, spawn: Spawn, ns: MountNamespace) -> None:
    """What a kill in the middle of a journal write leaves (a line without its end), after a real kill -9
    mid-job; a write cannot be hit by a signal on purpose, so the test tears the line itself."""
    folder = short_tmp / "out"
    ns.mount_tmpfs(folder, "64M")
    daemon = start(spawn, ns, short_tmp)
    out = folder / "out.parquet"
    job_id, _ = slow_job(daemon, short_tmp, out)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    journal = ns.inside(parts_dir(out)) / "journal.jsonl"
    with journal.open("ab") as f:
        f.write(json.dumps([7, 1, "a response cut short by the kill", "stop"]).encode()[:30])

    again = start(spawn, ns, short_tmp, again=daemon)
    found = wait_ended(again, job_id)
    assert found["state"] == "JOB_STATE_SUCCEEDED", (found, again.stderr[-3000:])
    assert_each_pair_once(pq.read_table(ns.inside(out)), SLOW_PROMPTS, K)


def test_the_parts_directory_removed_mid_job(short_tmp: Path, spawn: Spawn, ns: MountNamespace) -> None:
    folder = short_tmp / "out"
    ns.mount_tmpfs(folder, "64M")
    daemon = start(spawn, ns, short_tmp)
    out = folder / "out.parquet"
    job_id, data = slow_job(daemon, short_tmp, out)
    shutil.rmtree(ns.inside(parts_dir(out)))  # a careless cleanup script

    found = watch_to_the_end(daemon, job_id, "parts removed")
    assert found["message"].startswith(f"{parts_dir(out)} was removed while the job ran"), found["message"]
    resume(daemon, data, out)
    assert_each_pair_once(pq.read_table(ns.inside(out)), SLOW_PROMPTS, K)
    assert leftovers(ns.inside(folder)) == ["out.parquet"]
