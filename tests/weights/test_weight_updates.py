"""Weight updates through a real mvllmd, on mvllm-sim instances: checkpoints are directories, and the
simulator marks every word it writes with the weights that made it (mvllm_sim.weights), so a test can
tell, token by token, which weights made a sample, and check the version mvllmd recorded for it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from mvllm_sim.text import pieces, weights_tag
from mvllm_sim.weights import make_checkpoint

from daemonkit import MVLLMCTL, DaemonProcess, Spawn, instance_status, wait_for
from jobkit import JOB_TIMEOUT_S, assert_each_pair_once, daemon_args, job, submit, write_prompts

ROOT = Path(__file__).resolve().parents[2]
SIM = ("--time-scale", "0.001")
# Slow enough that a job of a few hundred prompts runs for seconds: an update lands in its middle.
SLOW = ("--time-scale", "0.5", "--max-num-seqs", "32")


def checkpoints(tmp: Path, *tags: int) -> list[Path]:
    return [make_checkpoint(tmp / f"step-{i}", tag) for i, tag in enumerate(tags)]


def launch(daemon: DaemonProcess, model: Path, n: int, *engine_args: str, name: str = "m") -> None:
    done = daemon.ctl("launch", str(model), "--engine", "sim", "-n", str(n), "--name", name, "--weight-updates",
                      "--", *engine_args)  # fmt: skip
    assert done.returncode == 0, done.stderr


def update(daemon: DaemonProcess, model: Path, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return daemon.ctl("weights", "update", str(model), "--path", str(path), *args, "--json")


def versions(daemon: DaemonProcess) -> dict[str, str]:
    return {i["name"]: i["weight_version"] for i in instance_status(daemon.ctl)}


def is_paused(daemon: DaemonProcess, name: str) -> bool:
    (url,) = [i["url"] for i in instance_status(daemon.ctl) if i["name"] == name]
    return bool(httpx.get(f"{url}/is_paused", timeout=10).json()["is_paused"])


def tags_of(text: str) -> list[int]:
    return [weights_tag(word) for word in pieces(text)]


def streamed_text(body: str) -> str:
    events = [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]
    return "".join(c["text"] for e in events if e != "[DONE]" for c in json.loads(e)["choices"])


def runs(values: list[Any]) -> list[Any]:
    """[a, a, b, b, a] -> [a, b, a]."""
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def greedy(url: str, model: Path) -> str:
    body = {"model": str(model), "prompt": "Tell me a story", "max_tokens": 16, "temperature": 0, "seed": 1}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["choices"][0]["text"])


def test_an_update_in_place_serves_the_new_weights_and_survives_a_restart(short_tmp: Path, spawn: Spawn) -> None:
    a, b = checkpoints(short_tmp, 3, 9)
    daemon = spawn(daemon_args(short_tmp))
    launch(daemon, a, 2, *SIM)
    assert versions(daemon) == {"m-0": "step-0", "m-1": "step-0"}
    urls = [i["url"] for i in instance_status(daemon.ctl)]
    assert all(set(tags_of(greedy(url, a))) == {3} for url in urls)

    done = update(daemon, a, b, "--version", "v1")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["done"], result
    assert [i["step"] for i in result["instances"]] == ["UPDATE_STEP_DONE"] * 2
    assert [(i["old_version"], i["version"]) for i in result["instances"]] == [("step-0", "v1")] * 2
    assert versions(daemon) == {"m-0": "v1", "m-1": "v1"}
    for url in urls:
        assert set(tags_of(greedy(url, a))) == {9}  # the new weights answer, under the same model name
        assert httpx.get(f"{url}/weight_info", timeout=10).json() == {"weight_version": "v1"}
    shown = daemon.ctl("status").stdout
    assert "WEIGHTS" in shown and [line.split()[-1] for line in shown.splitlines()[1:]] == ["v1", "v1"]

    first = instance_status(daemon.ctl)[0]
    os.kill(first["pid"], signal.SIGKILL)
    wait_for(lambda: instance_status(daemon.ctl)[0]["restarts"] == 1, 30)
    wait_for(lambda: instance_status(daemon.ctl)[0]["state"] == "INSTANCE_STATE_READY", 30)
    assert set(tags_of(greedy(first["url"], a))) == {9}  # started again from the new path
    assert httpx.get(f"{first['url']}/weight_info", timeout=10).json() == {"weight_version": "v1"}
    assert versions(daemon)["m-0"] == "v1"


@pytest.mark.parametrize("mode", ["keep", "wait"])
def test_mid_job_every_sample_once_and_every_token_under_the_version_recorded(
    short_tmp: Path, spawn: Spawn, mode: str
) -> None:
    a, b, c = checkpoints(short_tmp, 2, 7, 12)
    daemon = spawn(daemon_args(short_tmp))
    launch(daemon, a, 2, *SLOW)
    prompts, k = 160, 4
    data = write_prompts(short_tmp / "in.parquet", prompts)
    out = short_tmp / "out.parquet"
    job_id = submit(daemon, data, out, "-k", str(k), "--max-tokens", "256", "--model", str(a))
    wait_for(lambda: job(daemon, job_id)["samples_done"] >= prompts * k // 8, JOB_TIMEOUT_S)
    assert update(daemon, a, b, "--mode", mode).returncode == 0
    wait_for(lambda: job(daemon, job_id)["samples_done"] >= prompts * k * 3 // 8, JOB_TIMEOUT_S)
    assert update(daemon, a, c, "--mode", mode, "--rolling").returncode == 0
    assert job(daemon, job_id)["state"] == "JOB_STATE_RUNNING"  # else the test proves less than it says
    wait_for(lambda: job(daemon, job_id)["state"] != "JOB_STATE_RUNNING", JOB_TIMEOUT_S)
    assert job(daemon, job_id)["state"] == "JOB_STATE_SUCCEEDED"

    table = pq.read_table(out)
    assert_each_pair_once(table, prompts, k)
    tag = {"step-0": 2, "step-1": 7, "step-2": 12}
    spans = []
    for text, recorded, last in zip(table.column("response").to_pylist(), table.column("weight_versions").to_pylist(),
                                    table.column("weight_version").to_pylist(), strict=True):  # fmt: skip
        assert recorded and last == recorded[-1]
        assert runs(tags_of(text)) == [tag[v] for v in recorded], (text, recorded)
        spans.append(len(recorded))
    made_by = {v for versions in table.column("weight_versions").to_pylist() for v in versions}
    assert made_by == {"step-0", "step-1", "step-2"}  # the job ran before, between and after the updates
    if mode == "keep":
        assert max(spans) > 1  # samples frozen by the pause went on under the new weights
    else:
        assert max(spans) == 1  # `wait` lets each finish under the weights it began with


def test_bad_input_changes_nothing(short_tmp: Path, spawn: Spawn) -> None:
    a, b = checkpoints(short_tmp, 1, 5)
    daemon = spawn(daemon_args(short_tmp))
    launch(daemon, a, 1, *SIM)
    plain = daemon.ctl("launch", "plain", "--engine", "sim", "-n", "1", "--", *SIM)
    assert plain.returncode == 0, plain.stderr

    missing = update(daemon, a, short_tmp / "no-such-checkpoint")
    assert missing.returncode == 2 and "no such directory" in missing.stderr and "nothing was changed" in missing.stderr
    unknown = update(daemon, Path("nope"), b)
    assert unknown.returncode == 2 and "no instance serves model 'nope'" in unknown.stderr
    without = daemon.ctl("weights", "update", "plain", "--path", str(b))
    assert without.returncode == 2 and "plain-0 run without weight updates" in without.stderr
    assert "--weight-updates" in without.stderr
    off_loopback = daemon.ctl("launch", "x", "--engine", "sim", "--weight-updates", "--host", "0.0.0.0")
    assert off_loopback.returncode == 2 and "needs --host on loopback" in off_loopback.stderr
    assert versions(daemon) == {"m-0": "step-0", "plain-0": ""}

    # Two updates of one model at once: the second is refused while the first runs (a reload of 3 s).
    launch(daemon, a, 1, "--time-scale", "1", "--reload-s", "3", name="slow")
    argv = [MVLLMCTL, "--address", daemon.address, "weights", "update", str(a), "--path", str(b)]
    first = subprocess.Popen(argv, env=daemon.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: is_paused(daemon, "slow-0") or first.poll() is not None, 20)
    second = update(daemon, a, b)
    assert second.returncode == 1 and "being updated" in second.stderr, second.stderr
    _, error = first.communicate(timeout=60)
    assert first.returncode == 0, error
    assert versions(daemon) == {"m-0": "step-1", "plain-0": "", "slow-0": "step-1"}


def test_an_update_that_fails_restarts_that_instance_on_the_new_path(short_tmp: Path, spawn: Spawn) -> None:
    a, b = checkpoints(short_tmp, 4, 11)
    daemon = spawn(daemon_args(short_tmp))
    launch(daemon, a, 1, *SIM, name="good")
    launch(daemon, a, 1, *SIM, "--fail-reloads", name="bad")
    done = update(daemon, a, b, "--version", "v2")
    assert done.returncode == 1, done.stderr
    steps = {i["name"]: i for i in json.loads(done.stdout)["instances"]}
    assert steps["good-0"]["step"] == "UPDATE_STEP_DONE"
    assert steps["bad-0"]["step"] == "UPDATE_STEP_FAILED" and "restarted on the new weights" in steps["bad-0"]["error"]
    wait_for(lambda: {i["name"]: i["restarts"] for i in instance_status(daemon.ctl)}["bad-0"] == 1, 30)
    wait_for(lambda: all(i["state"] == "INSTANCE_STATE_READY" for i in instance_status(daemon.ctl)), 30)
    assert versions(daemon) == {"bad-0": "v2", "good-0": "v2"}
    bad = next(i for i in instance_status(daemon.ctl) if i["name"] == "bad-0")
    assert set(tags_of(greedy(bad["url"], a))) == {11}


def test_the_rl_loop_example_three_iterations(short_tmp: Path, spawn: Spawn) -> None:
    ckpts = checkpoints(short_tmp / "ckpt", 0, 6, 8, 13)
    daemon = spawn(daemon_args(short_tmp))
    launch(daemon, ckpts[0], 2, *SIM)
    data = write_prompts(short_tmp / "prompts.parquet", 20)
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "rl_loop.py"), "--address", daemon.address, "--model", str(ckpts[0]),
         "--prompts", str(data), "--checkpoints", str(short_tmp / "ckpt"), "--work", str(short_tmp / "rl"),
         "--iterations", "3"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for i, tag in enumerate((0, 6, 8)):
        table = pq.read_table(short_tmp / "rl" / f"rollouts-{i}.parquet")
        assert set(table.column("weight_version").to_pylist()) == {f"step-{i}"}
        assert all(set(tags_of(t)) == {tag} for t in table.column("response").to_pylist())
        assert f"iteration {i}: 80 rows" in done.stdout
    assert versions(daemon) == {"m-0": "step-3", "m-1": "step-3"}


def test_the_front_door_says_the_version_and_pins_to_it(short_tmp: Path, spawn: Spawn) -> None:
    a, b = checkpoints(short_tmp, 2, 10)
    daemon = spawn(daemon_args(short_tmp))
    launch(daemon, a, 1, *SIM, name="new")
    assert update(daemon, a, b, "--version", "v-b").returncode == 0
    launch(daemon, a, 1, *SIM, name="old")  # launched from A afterwards: one server of the model at each version
    assert versions(daemon) == {"new-0": "v-b", "old-0": "step-0"}
    (door,) = json.loads(daemon.ctl("info", "--json").stdout)["http_urls"]
    body = {"model": str(a), "prompt": "hi", "max_tokens": 4}
    for version, tag in (("v-b", 10), ("step-0", 2)):
        for stream in (False, True):
            pinned = httpx.post(f"{door}/v1/completions", json={**body, "stream": stream},
                                headers={"X-Mvllm-Weight-Version": version}, timeout=30)  # fmt: skip
            assert pinned.status_code == 200, pinned.text
            assert pinned.headers["x-mvllm-weight-version"] == version
            text = streamed_text(pinned.text) if stream else pinned.json()["choices"][0]["text"]
            assert text and set(tags_of(text)) == {tag}
    nowhere = httpx.post(f"{door}/v1/completions", json=body, headers={"X-Mvllm-Weight-Version": "v-z"}, timeout=30)
    assert nowhere.status_code == 503 and "at weight version v-z" in nowhere.text


def test_sleep_and_wake(short_tmp: Path, spawn: Spawn) -> None:
    a, _ = checkpoints(short_tmp, 3, 5)
    daemon = spawn(daemon_args(short_tmp))
    launch(daemon, a, 2, *SIM)
    asleep = daemon.ctl("sleep", str(a), "--level", "2", "--json")
    assert asleep.returncode == 0, asleep.stderr
    assert [i["ok"] for i in json.loads(asleep.stdout)["instances"]] == [True, True]
    assert "(asleep 2)" in daemon.ctl("status").stdout
    urls = [i["url"] for i in instance_status(daemon.ctl)]
    assert all(httpx.get(f"{u}/is_sleeping", timeout=10).json() == {"is_sleeping": True} for u in urls)
    data = write_prompts(short_tmp / "in.parquet", 10)
    job_id = submit(daemon, data, short_tmp / "out.parquet", "-k", "2", "--max-tokens", "8", "--model", str(a))
    time.sleep(1.0)
    assert job(daemon, job_id)["samples_done"] == 0  # its work waits for a server that is awake
    woken = daemon.ctl("wake", str(a))
    assert woken.returncode == 0, woken.stderr
    wait_for(lambda: job(daemon, job_id)["state"] == "JOB_STATE_SUCCEEDED", JOB_TIMEOUT_S)
    table = pq.read_table(short_tmp / "out.parquet")
    assert all(set(tags_of(t)) == {3} for t in table.column("response").to_pylist())  # level 2: weights reloaded


def test_an_instance_that_restarts_while_asleep_comes_back_awake(short_tmp: Path, spawn: Spawn) -> None:
    (a,) = checkpoints(short_tmp, 4)
    daemon = spawn(daemon_args(short_tmp))
    launch(daemon, a, 2, *SIM)
    assert daemon.ctl("sleep", str(a)).returncode == 0
    first = instance_status(daemon.ctl)[0]
    os.kill(first["pid"], signal.SIGKILL)
    wait_for(lambda: instance_status(daemon.ctl)[0]["restarts"] == 1, 30)
    wait_for(lambda: instance_status(daemon.ctl)[0]["state"] == "INSTANCE_STATE_READY", 30)
    wait_for(lambda: instance_status(daemon.ctl)[0]["sleep_level"] == 0, 10)
    assert instance_status(daemon.ctl)[1]["sleep_level"] == 1  # the other still sleeps
    data = write_prompts(short_tmp / "in.parquet", 10)
    job_id = submit(daemon, data, short_tmp / "out.parquet", "-k", "2", "--max-tokens", "8", "--model", str(a))
    wait_for(lambda: job(daemon, job_id)["state"] == "JOB_STATE_SUCCEEDED", JOB_TIMEOUT_S)
    served = set(pq.read_table(short_tmp / "out.parquet").column("endpoint").to_pylist())
    assert served == {first["url"]}  # the restarted one took the work; the sleeping one none
