"""Rollout jobs through the real daemon and the real CLI: mvllmd with its process supervisor, mvllm-sim
instances launched by `mvllmctl launch`, real parquet and JSONL files, and every result read back
through `mvllmctl` or from the output file. Faults are in test_job_faults.py."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvllm.v1 import job_pb2
from mvllm_sim.text import chat_prompt, token_ids
from mvllmd.jobs.output import DoneMap, load_done, parts_dir

from daemonkit import MVLLMCTL, DaemonProcess, Spawn, start_daemon
from jobkit import (
    FAST_SIM,
    SLOW_PROMPTS,
    SLOW_SIM,
    assert_each_pair_once,
    daemon_args,
    job,
    job_count,
    job_daemon,
    jobs,
    launch,
    leftovers,
    progress,
    run_ctl,
    snapshot,
    submit,
    wait_ended,
    wait_job,
    wait_samples,
    write_prompts,
)
from simkit import SimProcess

N, K = 300, 4


# --- one job, start to finish --------------------------------------------------------------------


def test_submit_wait_writes_every_pair_once_with_the_input_columns(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 2, *FAST_SIM)
    data = write_prompts(short_tmp / "in.parquet", N, id=[10 * i for i in range(N)], response=["given"] * N)
    before = snapshot(data)
    out = short_tmp / "out.parquet"

    done = daemon.ctl("submit", "-d", str(data), "-o", str(out), "-k", str(K), "--max-tokens", "8", "--wait")
    assert done.returncode == 0, done.stderr
    assert "SUCCEEDED" in done.stdout
    assert f"{N * K} of {N * K}" in done.stdout
    assert f"{N * K} samples written" in done.stdout

    table = pq.read_table(out)
    assert_each_pair_once(table, N, K)
    assert table.column("id").to_pylist() == [10 * p for p in range(N) for _ in range(K)]  # carried through
    assert table.column("input_response").to_pylist() == ["given"] * (N * K)  # collided with `response`
    assert table.column("response").to_pylist() != table.column("input_response").to_pylist()
    assert table.column("prompt").to_pylist()[K] == "prompt 1: tell me about the number 1"
    assert snapshot(data) == before
    assert not (short_tmp / "out.parquet.parts").exists()
    assert [name for name in leftovers(short_tmp) if name.startswith(".")] == []  # no temp file or probe left

    (listed,) = jobs(daemon)
    found = job(daemon, listed["id"])
    assert found["state"] == "JOB_STATE_SUCCEEDED"
    assert (found["samples_total"], found["samples_done"], found["errors"]) == (N * K, N * K, 0)
    assert found["output_path"] == str(out)
    assert found["model"] == "m"
    assert {e["instance"] for e in found["endpoints"]} == {"m-0", "m-1"}
    assert sum(int(e["completed"]) for e in found["endpoints"]) >= N * K


def test_the_cli_around_a_finished_job(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 1, *FAST_SIM)
    data, out = write_prompts(short_tmp / "in.parquet", 50), short_tmp / "out.parquet"
    job_id = submit(daemon, data, out, "-k", "2", "--max-tokens", "4", "--no-hedge")
    wait_ended(daemon, job_id)

    table = daemon.ctl("jobs")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:3] == ["ID", "STATE", "SAMPLES"]
    assert row.split()[:4] == [job_id, "SUCCEEDED", "100/100", "100%"]

    shown = daemon.ctl("job", job_id)
    assert shown.returncode == 0, shown.stderr
    assert "SUCCEEDED" in shown.stdout and str(data) in shown.stdout and "m-0" in shown.stdout
    assert "least-loaded, no hedging" in shown.stdout
    as_json = daemon.ctl("job", job_id, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["spec"]["no_hedge"] is True

    watched = daemon.ctl("watch", job_id)  # an ended job: its summary at once, and its outcome as exit status
    assert watched.returncode == 0, watched.stderr
    assert "SUCCEEDED" in watched.stdout

    again = daemon.ctl("submit", "-d", str(data), "-o", str(out), "-k", "2", "--max-tokens", "4")
    assert again.returncode == 1
    assert "exists; pass --resume to finish it, or --overwrite to replace it" in again.stderr
    noop = daemon.ctl("submit", "-d", str(data), "-o", str(out), "-k", "2", "--max-tokens", "4", "--resume", "--wait")
    assert noop.returncode == 0, noop.stderr  # this very job wrote all of it: nothing to do
    assert len(jobs(daemon)) == 2

    cancel = daemon.ctl("cancel", job_id)
    assert cancel.returncode == 1
    assert "has ended already" in cancel.stderr
    unknown = daemon.ctl("job", "nosuchjob")
    assert unknown.returncode == 1
    assert "no job 'nosuchjob'" in unknown.stderr

    pruned = daemon.ctl("jobs", "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "removed 2 job records" in pruned.stdout
    assert jobs(daemon) == []
    assert pq.read_table(out).num_rows == 100  # pruning forgets records, never outputs


def test_submit_wait_draws_a_live_bar_on_a_terminal(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 1, *SLOW_SIM)  # a few seconds: several redraws
    data, out = write_prompts(short_tmp / "in.parquet", 100), short_tmp / "out.parquet"
    primary, secondary = pty.openpty()  # stderr is a terminal; stdout is not
    argv = [MVLLMCTL, "--address", daemon.address, "submit", "-d", str(data), "-o", str(out), "-k", "2",
            "--max-tokens", "8", "--wait"]  # fmt: skip
    env = dict(daemon.env, COLUMNS="120", TERM="xterm")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=secondary, env=env)
    os.close(secondary)
    drawn = b""
    while True:  # read as it draws: a full terminal buffer would stall it
        ready, _, _ = select.select([primary], [], [], 60)
        assert ready, "no output for 60 s"
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the other end closed, the process has ended
            break
        if not chunk:
            break
        drawn += chunk
    os.close(primary)
    summary, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    text = drawn.decode(errors="replace")
    assert text.count("running") >= 2, text  # redrawn in place while it ran
    assert "200/200" in text and "tok/s" in text and "in flight" in text
    assert b"\x1b[" in drawn  # terminal control sequences: a bar, not log lines
    assert b"SUCCEEDED" in summary


def test_cancel_keeps_the_parts_and_resume_finishes_each_pair_once(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 2, "--time-scale", "2", "--max-num-seqs", "16")  # slower: two mvllmctl calls land mid-job
    prompts = SLOW_PROMPTS
    data, out = write_prompts(short_tmp / "in.parquet", prompts), short_tmp / "out.parquet"
    argv = ["submit", "-d", str(data), "-o", str(out), "-k", str(K), "--max-tokens", "8", "--wait"]
    waiting = subprocess.Popen([MVLLMCTL, "--address", daemon.address, *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=daemon.env)  # fmt: skip
    assert waiting.stderr is not None
    job_id = waiting.stderr.readline().split()[1].rstrip(":")  # "job ID: N samples (0 done) -> OUT"
    wait_samples(daemon, job_id, 200)
    waiting.send_signal(signal.SIGINT)  # Ctrl-C detaches from the job; it goes on
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 130, err
    assert f"detached; job {job_id} goes on" in err and "Traceback" not in err
    assert progress(daemon, job_id).state == job_pb2.JOB_STATE_RUNNING

    cancelled = daemon.ctl("cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "CANCELLED" in cancelled.stdout
    assert "submit it again with --resume" in cancelled.stdout
    found = job(daemon, job_id)
    assert found["state"] == "JOB_STATE_CANCELLED"
    assert 200 <= found["samples_done"] < prompts * K
    assert (short_tmp / "out.parquet.parts").is_dir()
    assert not out.exists()

    resumed = daemon.ctl("submit", "-d", str(data), "-o", str(out), "-k", str(K), "--max-tokens", "8", "--resume",
                         "--wait", "--json")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"({found['samples_done']} done)" in resumed.stderr.splitlines()[0]  # the parts' samples count: reused
    final = json.loads(resumed.stdout)
    assert final["state"] == "JOB_STATE_SUCCEEDED"
    assert int(final["samples_done"]) == prompts * K
    assert_each_pair_once(pq.read_table(out), prompts, K)
    assert not (short_tmp / "out.parquet.parts").exists()


def test_a_changed_resume_is_refused(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 1, *SLOW_SIM)
    data, out = write_prompts(short_tmp / "in.parquet", SLOW_PROMPTS), short_tmp / "out.parquet"
    job_id = submit(daemon, data, out, "-k", "2", "--max-tokens", "8")
    wait_samples(daemon, job_id, 20)
    assert daemon.ctl("cancel", job_id).returncode == 0
    changed = daemon.ctl("submit", "-d", str(data), "-o", str(out), "-k", "3", "--max-tokens", "8", "--resume")
    assert changed.returncode == 1
    assert "cannot resume: num_samples differ" in changed.stderr
    assert (short_tmp / "out.parquet.parts").is_dir()


# --- several jobs --------------------------------------------------------------------------------


def test_with_one_job_at_a_time_the_second_waits_queued(short_tmp: Path, spawn: Spawn) -> None:
    # The first job would take a minute; cancelled, it lets its requests in flight finish for 1 s at most.
    daemon = job_daemon(spawn, short_tmp, "--max-running-jobs", "1", "--job-stop-drain", "1")
    launch(daemon, 2, "--time-scale", "10", "--max-num-seqs", "16")
    data = write_prompts(short_tmp / "in.parquet", SLOW_PROMPTS)
    first = submit(daemon, data, short_tmp / "a.parquet", "-k", str(K), "--max-tokens", "8")
    wait_samples(daemon, first, 20)
    small = write_prompts(short_tmp / "small.parquet", 40)
    second = submit(daemon, small, short_tmp / "b.parquet", "--max-tokens", "8")

    listing = daemon.ctl("jobs")
    assert listing.returncode == 0, listing.stderr
    states = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()[1:]}
    assert states == {first: "RUNNING", second: "QUEUED"}
    assert job(daemon, second)["samples_done"] == 0

    assert daemon.ctl("cancel", first).returncode == 0  # the queue moves on at once
    assert wait_ended(daemon, second)["state"] == "JOB_STATE_SUCCEEDED"
    assert_each_pair_once(pq.read_table(short_tmp / "b.parquet"), 40, 1)

    pruned = daemon.ctl("jobs", "--prune", "--json")
    assert pruned.returncode == 0, pruned.stderr
    removed = json.loads(pruned.stdout)
    assert sorted(removed["removed_ids"]) == sorted([first, second])
    assert removed["removed_parts"] == [str(short_tmp / "a.parquet.parts")]  # the cancelled job's parts
    assert not (short_tmp / "a.parquet.parts").exists()


def test_two_running_jobs_share_the_instances(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 2, *SLOW_SIM)
    data = write_prompts(short_tmp / "in.parquet", SLOW_PROMPTS)
    ids = [submit(daemon, data, short_tmp / f"{name}.parquet", "-k", str(K), "--max-tokens", "8") for name in "ab"]

    def both_progress(_: object) -> bool:
        found = [progress(daemon, i) for i in ids]
        return all(j.state == job_pb2.JOB_STATE_RUNNING and 0 < j.samples_done < j.samples_total for j in found)

    wait_job(daemon, ids[0], both_progress)  # both at once, neither waiting for the other to end
    busy = daemon.ctl("submit", "-d", str(data), "-o", str(short_tmp / "a.parquet"), "--overwrite")
    assert busy.returncode == 1
    assert f"job {ids[0]} is already writing {short_tmp / 'a.parquet'}" in busy.stderr
    watched = daemon.ctl("watch", ids[0])  # follows the running job to its end
    assert watched.returncode == 0, watched.stderr
    assert "SUCCEEDED" in watched.stdout and f"{SLOW_PROMPTS * K} of {SLOW_PROMPTS * K}" in watched.stdout
    for job_id, name in zip(ids, "ab", strict=True):
        found = wait_ended(daemon, job_id)
        assert found["state"] == "JOB_STATE_SUCCEEDED"
        assert {e["instance"] for e in found["endpoints"]} == {"m-0", "m-1"}  # each job on both servers
        assert_each_pair_once(pq.read_table(short_tmp / f"{name}.parquet"), SLOW_PROMPTS, K)


# --- prompts and sampling ------------------------------------------------------------------------


def test_chat_messages_from_jsonl_go_to_chat_completions(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 1, *FAST_SIM)
    contents = [f"question {i}" for i in range(40)]
    data = short_tmp / "chats.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": c}], "n": i}) + "\n"
                            for i, c in enumerate(contents)))  # fmt: skip
    out = short_tmp / "out.parquet"
    done = daemon.ctl("submit", "-d", str(data), "-o", str(out), "-k", "2", "--max-tokens", "8", "--wait")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out)
    assert_each_pair_once(table, 40, 2)
    # The server saw the chat template around each message: only /v1/chat/completions applies it.
    wanted = [len(token_ids(chat_prompt([("user", c)]))) for c in contents for _ in range(2)]
    assert table.column("prompt_tokens").to_pylist() == wanted
    assert table.column("n").to_pylist() == [i for i in range(40) for _ in range(2)]


def test_logprobs_and_token_ids_for_text_and_chat_prompts(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 1, *FAST_SIM)
    text = write_prompts(short_tmp / "text.parquet", 20)
    chat = short_tmp / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"q {i}"}]}) + "\n" for i in range(20)))
    for data in (text, chat):
        out = short_tmp / f"{data.stem}.out.parquet"
        done = daemon.ctl("submit", "-d", str(data), "-o", str(out), "-k", "2", "--max-tokens", "8", "--logprobs", "2",
                          "--return-token-ids", "--wait")  # fmt: skip
        assert done.returncode == 0, done.stderr
        table = pq.read_table(out)
        assert_each_pair_once(table, 20, 2)
        lengths = table.column("completion_tokens").to_pylist()
        assert all(n and n > 0 for n in lengths), data
        assert [len(v) for v in table.column("logprobs").to_pylist()] == lengths  # one per token
        assert [len(v) for v in table.column("token_ids").to_pylist()] == lengths
        assert all(v <= 0 for row in table.column("logprobs").to_pylist() for v in row)


def test_a_prompt_that_fails_for_good_is_recorded_or_fails_the_job(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 1, *FAST_SIM, "--max-model-len", "32")
    prompts = [f"question {i}" for i in range(1000)]
    prompts[40] = " ".join(["word"] * 40)  # longer than the context: refused with 400, whatever is retried
    data = short_tmp / "in.parquet"
    pq.write_table(pa.table({"prompt": prompts}), data)
    recorded, failed = short_tmp / "recorded.parquet", short_tmp / "failed.parquet"

    done = daemon.ctl("submit", "-d", str(data), "-o", str(recorded), "-k", "2", "--max-tokens", "8", "--wait")
    assert done.returncode == 0, (done.stderr, daemon.stderr[-5000:])  # errors recorded: the job still succeeded
    assert "SUCCEEDED" in done.stdout and re.search(r"errors\s+2\n", done.stdout), done.stdout
    table = pq.read_table(recorded)
    keys = list(zip(table.column("prompt_index").to_pylist(), table.column("sample_index").to_pylist(), strict=True))
    assert keys == [(p, s) for p in range(1000) for s in range(2)]
    errors = table.column("error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [80, 81] and "HTTP 400" in errors[80]

    stopped = daemon.ctl("submit", "-d", str(data), "-o", str(failed), "-k", "2", "--max-tokens", "8",
                         "--on-error", "fail", "--max-concurrent", "16", "--wait", "--json")  # fmt: skip
    assert stopped.returncode == 1, stopped.stderr
    found = json.loads(stopped.stdout)
    assert found["state"] == "JOB_STATE_FAILED"
    assert int(found.get("samples_done", 0)) < 1000  # it stopped there, far from the end
    assert "prompt 40" in found["message"] and "HTTP 400" in found["message"]
    assert not failed.exists()
    assert daemon.ctl("info").returncode == 0


BATCHED_SIM = ("--time-scale", "0.05", "--max-num-seqs", "16")  # small batches: requests queue, timing varies


def seeded_runs(daemon: DaemonProcess, tmp: Path, policy: str) -> list[pa.Table]:
    data = write_prompts(tmp / "in.parquet", 200)
    tables = []
    for name in ("one", "two"):
        out = tmp / f"{policy}-{name}.parquet"
        done = daemon.ctl("submit", "-d", str(data), "-o", str(out), "-k", "3", "--max-tokens", "8", "--seed", "7",
                          "--policy", policy, "--wait")  # fmt: skip
        assert done.returncode == 0, done.stderr
        tables.append(pq.read_table(out))
    return tables


def test_seeded_jobs_record_their_seeds_and_repeat(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 2, *BATCHED_SIM)
    data = write_prompts(short_tmp / "in.parquet", 200)
    tables = seeded_runs(daemon, short_tmp, "round-robin")
    for table in tables:
        assert_each_pair_once(table, 200, 3)
        assert table.column("seed").null_count == 0
    assert tables[0].column("seed").to_pylist() == tables[1].column("seed").to_pylist()
    assert tables[0].column("response").to_pylist() == tables[1].column("response").to_pylist()
    unseeded = short_tmp / "none.parquet"
    assert daemon.ctl("submit", "-d", str(data), "-o", str(unseeded), "--max-tokens", "8", "--wait").returncode == 0
    assert pq.read_table(unseeded).column("seed").null_count == 200  # no --seed: none sent, none recorded


def test_seeded_least_loaded_jobs_repeat(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 2, *BATCHED_SIM)
    one, two = seeded_runs(daemon, short_tmp, "least-loaded")
    assert one.column("response").to_pylist() == two.column("response").to_pylist()


def test_seeded_samples_of_a_prompt_differ_when_its_request_is_split(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 1, *FAST_SIM)
    data, out = write_prompts(short_tmp / "in.parquet", 20), short_tmp / "out.parquet"
    # At most 2 samples in flight: each prompt's 4 samples go as two n=2 requests.
    done = daemon.ctl("submit", "-d", str(data), "-o", str(out), "-k", "4", "--max-tokens", "16", "--seed", "7",
                      "--max-concurrent", "2", "--wait")  # fmt: skip
    assert done.returncode == 0, done.stderr
    responses = pq.read_table(out).column("response").to_pylist()
    for p in range(20):
        assert len(set(responses[4 * p : 4 * p + 4])) == 4, responses[4 * p : 4 * p + 4]


# --- refusals ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[DaemonProcess, Path]]:
    """One daemon with one READY instance, shared by the refusal cases (each leaves it as it was)."""
    tmp = Path(tempfile.mkdtemp(prefix="mv-", dir="/tmp"))
    (tmp / "run").mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "MVLLM_", "NOTIFY_"))}
    env.update(XDG_RUNTIME_DIR=str(tmp / "run"), XDG_STATE_HOME=str(tmp / "state"), HOME=str(tmp / "home"))
    daemon = start_daemon(tmp, env, daemon_args(tmp))
    try:
        launch(daemon, 1, *FAST_SIM)
        work = tmp / "work"
        work.mkdir()
        write_prompts(work / "in.parquet", 10)
        (work / "garbage.parquet").write_bytes(b"PAR1 this is not parquet at all \x00\x01\x02" * 10)
        pq.write_table(pa.table({"text": ["a", "b"]}), work / "nocolumn.parquet")
        pq.write_table(pa.table({"prompt": [1, 2, 3]}), work / "ints.parquet")
        (work / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "broken\n{"prompt": "fine"}\n')
        (work / "adir.parquet").mkdir()
        yield daemon, work
    finally:
        daemon.stop()
        daemon.notify.close()
        shutil.rmtree(tmp, ignore_errors=True)


REFUSALS = [
    # (name, input, output, extra args, exit status, what stderr says)
    ("missing input", "missing.parquet", "out.parquet", (), 2, "missing.parquet: no such file"),
    ("corrupt parquet", "garbage.parquet", "out.parquet", (), 2, "garbage.parquet: not a readable parquet file"),
    ("no prompt column", "nocolumn.parquet", "out.parquet", (), 2, "no column 'prompt'; columns: text"),
    ("prompts are ints", "ints.parquet", "out.parquet", (), 2, "column 'prompt' has type int64"),
    ("bad JSONL line", "bad.jsonl", "out.parquet", (), 2, "bad.jsonl:2: not JSON"),
    ("output in /proc", "in.parquet", "/proc/x.parquet", (), 2, "cannot write the output in /proc"),
    ("output dir missing", "in.parquet", "nodir/x.parquet", (), 2, "nodir is not a directory"),
    ("output is input", "in.parquet", "in.parquet", (), 2, "is the input; write somewhere else"),
    ("output not parquet", "in.parquet", "out.csv", (), 2, "must be a .parquet file"),
    ("output is a directory", "in.parquet", "adir.parquet", ("--overwrite",), 2, "exists and is not a file"),
    ("unknown model", "in.parquet", "out.parquet", ("--model", "zzz"), 2, "no instance serves model 'zzz'; served: m"),
]


@pytest.mark.parametrize(("case", "data", "out", "extra", "code", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_input_is_refused_before_anything_runs(
    served: tuple[DaemonProcess, Path], case: str, data: str, out: str, extra: tuple[str, ...], code: int, message: str
) -> None:
    daemon, work = served
    files = {p.name: snapshot(p) for p in work.iterdir() if p.is_file()}
    count = job_count(daemon)
    done = daemon.ctl("submit", "-d", str(work / data), "-o", str(work / out), *extra, "--wait")
    assert done.returncode == code, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert {p.name: snapshot(p) for p in work.iterdir() if p.is_file()} == files  # no output, input untouched
    assert not (work / out).exists() or out in ("in.parquet", "adir.parquet")
    assert job_count(daemon) == count  # nothing recorded
    assert daemon.ctl("info").returncode == 0  # still serving


def test_no_instance_at_all(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    data, out = write_prompts(short_tmp / "in.parquet", 10), short_tmp / "out.parquet"
    done = daemon.ctl("submit", "-d", str(data), "-o", str(out))
    assert done.returncode == 1
    assert "no instance is running; launch one (mvllmctl launch MODEL)" in done.stderr.strip()
    assert not out.exists() and jobs(daemon) == []
    assert daemon.ctl("info").returncode == 0


def test_an_instance_still_starting_or_failed_is_not_ready(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    data, out = write_prompts(short_tmp / "in.parquet", 10), short_tmp / "out.parquet"
    # It fails to start (the simulator refuses TP 3): FAILED, no instance is running.
    assert daemon.ctl("launch", "bad", "--engine", "sim", "--", "--tensor-parallel-size", "3").returncode == 1
    failed = daemon.ctl("submit", "-d", str(data), "-o", str(out), "--model", "bad")
    assert failed.returncode == 1
    assert "no instance is running" in failed.stderr
    # It is starting (ready only after a minute): accepted only with --wait-for-instances.
    started = daemon.ctl("launch", "m", "--engine", "sim", "--no-wait", "--", "--startup-delay", "60", *FAST_SIM)
    assert started.returncode == 0, started.stderr
    starting = daemon.ctl("submit", "-d", str(data), "-o", str(out), "--model", "m")
    assert starting.returncode == 1
    assert "no instance serving m is READY yet" in starting.stderr and "--wait-for-instances" in starting.stderr
    assert not out.exists() and jobs(daemon) == []
    assert daemon.ctl("info").returncode == 0


def test_wait_for_instances_runs_the_job_once_one_is_ready(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    data, out = write_prompts(short_tmp / "in.parquet", 100), short_tmp / "out.parquet"
    unnamed = daemon.ctl("submit", "-d", str(data), "-o", str(out), "--wait-for-instances", "30")
    assert unnamed.returncode == 2
    assert "no instance runs yet to say which model to wait for; pass --model" in unnamed.stderr
    job_id = submit(daemon, data, out, "--model", "m", "--max-tokens", "8", "--wait-for-instances", "30")
    waiting = wait_job(daemon, job_id, lambda j: j.message != "")
    assert waiting.state == job_pb2.JOB_STATE_QUEUED
    assert waiting.message == "waiting up to 30s for a READY instance of m"
    launch(daemon, 1, *FAST_SIM)
    assert wait_ended(daemon, job_id)["state"] == "JOB_STATE_SUCCEEDED"
    assert_each_pair_once(pq.read_table(out), 100, 1)


def test_a_job_waiting_for_instances_can_be_cancelled(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    data, out = write_prompts(short_tmp / "in.parquet", 10), short_tmp / "out.parquet"
    job_id = submit(daemon, data, out, "--model", "m", "--wait-for-instances", "600")
    wait_job(daemon, job_id, lambda j: j.message != "")
    done = daemon.ctl("cancel", job_id)
    assert done.returncode == 0, done.stderr
    assert "CANCELLED: cancelled while it waited for an instance" in done.stdout
    assert not out.exists() and not (short_tmp / "out.parquet.parts").exists()


def test_wait_for_instances_gives_up_with_a_clear_message(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    data, out = write_prompts(short_tmp / "in.parquet", 10), short_tmp / "out.parquet"
    done = daemon.ctl("submit", "-d", str(data), "-o", str(out), "--model", "m", "--wait-for-instances", "1", "--wait")
    assert done.returncode == 1
    # (Twice, in CI, the watch ended before the job did, since fixed: tests/jobs/test_watch.py. The log says why.)
    assert "no instance serving m became READY within 1s" in done.stdout, (done.stderr, daemon.stderr[-3000:])
    assert not out.exists()


# --- generate-rollouts: the seed script's flags --------------------------------------------------


def test_generate_rollouts_without_mvllmd_runs_in_process(
    short_tmp: Path, clean_env: dict[str, str], sim_process: Callable[..., SimProcess]
) -> None:
    sims = [sim_process(*FAST_SIM) for _ in range(2)]
    for sim in sims:
        sim.wait_listening()
    env = dict(clean_env, MVLLM_ADDRESS=f"unix:{short_tmp}/nobody-listens.sock")
    data, out = write_prompts(short_tmp / "in.parquet", 100, id=list(range(100))), short_tmp / "out.parquet"
    urls = f"{sims[0].url}/v1,{sims[1].url}"  # with and without /v1, as the seed's users write them
    done = run_ctl(env, "generate-rollouts", "--use_vllm", "--vllm_base_url", urls, "--data_path", str(data),
                   "--output_path", str(out), "--num_samples", "3", "--vllm_max_concurrent", "50")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "mvllmd is not running: generating in this process" in done.stderr
    assert "SUCCEEDED" in done.stdout
    table = pq.read_table(out)
    assert table.schema.names[:10] == ["prompt_index", "sample_index", "response", "finish_reason", "prompt_tokens",
                                       "completion_tokens", "endpoint", "latency_s", "seed", "error"]  # fmt: skip
    assert_each_pair_once(table, 100, 3)
    assert set(table.column("endpoint").to_pylist()) == {sims[0].url, sims[1].url}
    assert table.column("id").to_pylist() == [p for p in range(100) for _ in range(3)]
    assert table.schema.metadata[b"model"] == b"sim"  # learned from /v1/models: no --model_path given


def test_generate_rollouts_interrupted_then_resumed(
    short_tmp: Path, clean_env: dict[str, str], sim_process: Callable[..., SimProcess]
) -> None:
    sim = sim_process("--time-scale", "1", "--max-num-seqs", "16")
    sim.wait_listening()
    env = dict(clean_env, MVLLM_ADDRESS=f"unix:{short_tmp}/nobody-listens.sock")
    data, out = write_prompts(short_tmp / "in.parquet", SLOW_PROMPTS), short_tmp / "out.parquet"
    argv = [MVLLMCTL, "generate-rollouts", "--vllm_base_url", sim.url, "--data_path", str(data),
            "--output_path", str(out), "--num_samples", "2", "--vllm_max_concurrent", "16"]  # fmt: skip
    running = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert running.stderr is not None
    assert "generating in this process" in running.stderr.readline()
    assert "job local running" in running.stderr.readline()  # the first progress line: it sends requests
    running.send_signal(signal.SIGINT)
    _, err = running.communicate(timeout=60)
    assert running.returncode == 130, err
    assert "run the same command with --resume to finish" in err and "Traceback" not in err
    assert not out.exists()
    assert load_done(parts_dir(out), DoneMap(SLOW_PROMPTS, 2)) > 0  # what was in flight was let finish, kept

    done = run_ctl(env, *argv[1:], "--resume")
    assert done.returncode == 0, done.stderr
    assert_each_pair_once(pq.read_table(out), SLOW_PROMPTS, 2)


def test_generate_rollouts_uses_mvllmd_when_it_runs(short_tmp: Path, spawn: Spawn) -> None:
    daemon = job_daemon(spawn, short_tmp)
    launch(daemon, 2, *FAST_SIM)
    env = dict(daemon.env, MVLLM_ADDRESS=daemon.address)
    data, out = write_prompts(short_tmp / "in.parquet", 100), short_tmp / "out.parquet"
    done = run_ctl(env, "generate-rollouts", "--use_vllm", "--model_path", "m", "--data_path", str(data),
                   "--output_path", str(out), "--num_samples", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"using mvllmd at {daemon.address}" in done.stderr
    assert_each_pair_once(pq.read_table(out), 100, 2)
    (listed,) = jobs(daemon)
    assert listed["state"] == "JOB_STATE_SUCCEEDED"
    assert int(listed["spec"]["max_concurrent"]) == 200  # --vllm_max_concurrent's default, as the seed's


def test_generate_rollouts_refusals(short_tmp: Path, clean_env: dict[str, str]) -> None:
    env = dict(clean_env, MVLLM_ADDRESS=f"unix:{short_tmp}/nobody-listens.sock")
    data = write_prompts(short_tmp / "in.parquet", 5)
    common = ["generate-rollouts", "--data_path", str(data), "--output_path", str(short_tmp / "out.parquet")]
    unknown = run_ctl(env, *common, "--vllm_temperature", "0.7")
    assert unknown.returncode == 2
    assert "Error: No such option '--vllm_temperature'" in unknown.stderr
    no_servers = run_ctl(env, *common)
    assert no_servers.returncode == 2
    assert "mvllmd is not running" in no_servers.stderr and "--vllm_base_url is needed" in no_servers.stderr
    dead = run_ctl(env, *common, "--vllm_base_url", "http://127.0.0.1:9/v1")
    assert dead.returncode == 2
    assert "none of the endpoints (http://127.0.0.1:9) answered /v1/models; pass --model" in dead.stderr
    assert sorted(p.name for p in short_tmp.glob("out*")) == []


def test_endpoints_that_need_an_api_key(short_tmp: Path, spawn: Spawn, sim_process: Callable[..., SimProcess]) -> None:
    """--endpoints servers behind a key: asked for their model and sent every request with it; the key
    is never shown back nor written to mvllmd's log."""
    secret = "sk-test-0123456789"
    sim = sim_process("--time-scale", "0", "--api-key", secret)
    sim.wait_listening()
    daemon = job_daemon(spawn, short_tmp)
    data, out = write_prompts(short_tmp / "in.parquet", 50), short_tmp / "out.parquet"
    refused = daemon.ctl("submit", "-d", str(data), "-o", str(out), "--endpoints", sim.url)
    assert refused.returncode == 2 and "answered /v1/models; pass --model" in refused.stderr  # 401 without it
    done = daemon.ctl("submit", "-d", str(data), "-o", str(out), "--endpoints", f"{sim.url}/v1", "--api-key", secret,
                      "-k", "2", "--max-tokens", "8", "--wait", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "JOB_STATE_SUCCEEDED"
    assert_each_pair_once(pq.read_table(out), 50, 2)
    shown = daemon.ctl("jobs", "--json").stdout
    assert secret not in shown and secret not in daemon.stderr
    mixed = daemon.ctl("submit", "-d", str(data), "-o", str(short_tmp / "x.parquet"), "--api-key", secret)
    assert mixed.returncode == 2 and "--api-key is for --endpoints servers" in mixed.stderr
