"""External servers through a real mvllmd: `mvllmctl attach` and `detach` of an mvllm-sim process that the
daemon did not launch; jobs and the front door use it while it is READY, and leave it when it is not."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from daemonkit import MVLLMCTL, DaemonProcess, Spawn, assert_short_error
from jobkit import FAST_SIM, assert_each_pair_once, daemon_args, launch, submit, wait_ended, write_prompts
from simkit import MVLLM_SIM, free_port

MODEL = "ext"
SECRET = "s3cret-key-for-the-external-server"
WAIT_S = 30.0


class Sim:
    """mvllm-sim as a plain process on a port of our choosing: killed and started again on the same one."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sim:
        argv = [MVLLM_SIM, "--model", MODEL, "--port", str(self.port), *FAST_SIM, *self.args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mvllm-sim exited {self.proc.returncode}"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise AssertionError("mvllm-sim did not open its port")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def sims() -> Iterator[list[Sim]]:
    started: list[Sim] = []
    yield started
    for sim in started:
        sim.kill()


def ctl(daemon: DaemonProcess, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    argv = [MVLLMCTL, "--address", daemon.address, *args]
    return subprocess.run(argv, capture_output=True, text=True, env=dict(daemon.env, **env), timeout=60, check=False)


def externals(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    done = daemon.ctl("status", "--json")
    assert done.returncode == 0, done.stderr
    return {s["name"]: s for s in json.loads(done.stdout)["external_servers"]}


def wait_state(daemon: DaemonProcess, name: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while (found := externals(daemon).get(name, {})).get("state") != f"INSTANCE_STATE_{state}":
        assert time.monotonic() < deadline, f"{name} not {state} in {WAIT_S}s: {found}\n{daemon.stderr[-2000:]}"
        time.sleep(0.2)
    return found


def front_door(daemon: DaemonProcess) -> str:
    done = daemon.ctl("info", "--json")
    assert done.returncode == 0, done.stderr
    (url,) = json.loads(done.stdout)["http_urls"]
    return str(url)


def served(door: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{door}/v1/models", timeout=10).json()["data"]]


def wait_served(door: str, models: list[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while served(door) != models:
        assert time.monotonic() < deadline, f"the front door serves {served(door)}, not {models}"
        time.sleep(0.1)


def test_attach_use_lose_regain_restart_detach(short_tmp: Path, spawn: Spawn, sims: list[Sim]) -> None:
    sim = Sim().start()
    sims.append(sim)
    args = daemon_args(short_tmp)
    daemon = spawn(args)
    name = f"127-0-0-1-{sim.port}"

    done = daemon.ctl("attach", f"{sim.url}/v1/", "--json")  # no --model, no --name: asked, and derived
    assert done.returncode == 0, done.stderr
    server = json.loads(done.stdout)["server"]
    assert server["name"] == name and server["url"] == sim.url and server["model"] == MODEL
    assert server["state"] == "INSTANCE_STATE_READY" and server["has_api_key"] is False
    assert server["max_num_seqs"] == 256  # the daemon's endpoint_max_num_seqs
    table = daemon.ctl("status").stdout
    (row,) = [line.split() for line in table.splitlines() if line.startswith(name)]
    assert row[:5] == [name, "READY", sim.url, MODEL, "external"], table

    # A job of its model runs on it, through the daemon (generate-rollouts with the seed's flags).
    data = write_prompts(short_tmp / "in.parquet", 40)
    out = short_tmp / "out.parquet"
    done = daemon.ctl("generate-rollouts", "--model_path", MODEL, "--data_path", str(data), "--output_path", str(out),
                      "--num_samples", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = pq.read_table(out)
    assert_each_pair_once(result, 40, 2)
    assert set(result.column("endpoint").to_pylist()) == {sim.url}

    # The front door answers through it.
    door = front_door(daemon)
    wait_served(door, [MODEL])
    answer = httpx.post(f"{door}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"]
    metrics = httpx.get(f"{door}/metrics", timeout=10).text
    assert 'mvllm_instances{engine="external",state="ready"} 1.0' in metrics

    # Killed: UNHEALTHY, out of the front door; a job waits for it, and runs once it is back on its port.
    sim.kill()
    assert "not answering" in wait_state(daemon, name, "UNHEALTHY")["message"]
    wait_served(door, [])
    refused = daemon.ctl("submit", "-d", str(data), "-o", str(short_tmp / "refused.parquet"), "--model", MODEL)
    assert_short_error(refused, 1, f"no instance serving {MODEL} is READY yet")
    waiting = submit(daemon, data, short_tmp / "later.parquet", "--model", MODEL, "--wait-for-instances", "60")
    sim.start()
    wait_state(daemon, name, "READY")
    wait_served(door, [MODEL])
    assert wait_ended(daemon, waiting)["state"] == "JOB_STATE_SUCCEEDED"
    assert_each_pair_once(pq.read_table(short_tmp / "later.parquet"), 40, 1)

    # The daemon restarted keeps it.
    assert daemon.stop() == 0
    daemon = spawn(args)
    assert wait_state(daemon, name, "READY")["url"] == sim.url
    wait_served(front_door(daemon), [MODEL])

    done = daemon.ctl("detach", name, "--json")
    assert done.returncode == 0, done.stderr
    detached = json.loads(done.stdout)["server"]
    assert detached["name"] == name and detached["state"] == "INSTANCE_STATE_STOPPED"
    assert externals(daemon) == {}
    wait_served(front_door(daemon), [])
    assert list((short_tmp / "j-state" / "external").iterdir()) == []
    assert daemon.ctl("detach", name).returncode == 1  # gone for good
    assert "Traceback" not in daemon.stderr


def test_an_api_key_is_sent_stored_privately_and_never_shown(short_tmp: Path, spawn: Spawn, sims: list[Sim]) -> None:
    sim = Sim("--api-key", SECRET).start()
    sims.append(sim)
    daemon = spawn(daemon_args(short_tmp))

    without = daemon.ctl("attach", sim.url)
    assert_short_error(without, 2, "answered /v1/models with 401", "--api-key-env")
    unset = ctl(daemon, "attach", sim.url, "--api-key-env", "NO_SUCH_VARIABLE")
    assert_short_error(unset, 2, "NO_SUCH_VARIABLE is not set")
    wrong = ctl(daemon, "attach", sim.url, "--api-key-env", "EXT_KEY", EXT_KEY="not-the-key")
    assert_short_error(wrong, 2, "the key given is refused")

    done = ctl(daemon, "attach", sim.url, "--name", "keyed", "--api-key-env", "EXT_KEY", "--json", EXT_KEY=SECRET)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["server"]["has_api_key"] is True
    assert json.loads(done.stdout)["server"]["state"] == "INSTANCE_STATE_READY"
    key_file = short_tmp / "j-state" / "external" / "keyed.key"
    assert key_file.read_text() == SECRET
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((key_file.parent / "keyed.json").stat().st_mode) == 0o600
    assert SECRET not in (key_file.parent / "keyed.json").read_text()

    # The front door, which has no tokens, does not hand it to any local user.
    door = front_door(daemon)
    wait_served(door, [MODEL])
    refused = httpx.post(f"{door}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=10)
    assert refused.status_code == 403 and "want an API key" in refused.text, refused.text

    # A job uses it with its key (the simulator refuses requests without it).
    data = write_prompts(short_tmp / "in.parquet", 20)
    job_id = submit(daemon, data, short_tmp / "out.parquet", "--model", MODEL, "-k", "2")
    job = wait_ended(daemon, job_id)
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["errors"] == 0, job
    assert_each_pair_once(pq.read_table(short_tmp / "out.parquet"), 20, 2)

    shown = [daemon.ctl("status").stdout, daemon.ctl("status", "--json").stdout, done.stdout, done.stderr,
             json.dumps(job), daemon.ctl("detach", "keyed", "--json").stdout, daemon.stderr]  # fmt: skip
    assert all(SECRET not in text for text in shown)
    assert not key_file.exists()


def test_bad_attaches_and_detaches(short_tmp: Path, spawn: Spawn, sims: list[Sim]) -> None:
    sim = Sim().start()
    sims.append(sim)
    daemon = spawn(daemon_args(short_tmp))
    for url, why in [
        ("ftp://127.0.0.1:8000", "is not an http:// or https:// URL"),
        ("http://", "names no host"),
        ("http://127.0.0.1:99999", "the port is not a number"),
        ("http://127.0.0.1:8000/v2/models", "only a scheme, a host and a port"),
    ]:
        assert_short_error(daemon.ctl("attach", url), 2, why)
    assert_short_error(daemon.ctl("attach", sim.url, "--name", "Not_A_Name"), 2, "is not allowed")
    assert_short_error(daemon.ctl("attach", sim.url, "--model", "other"), 2, "does not serve model 'other'")
    nobody = f"http://127.0.0.1:{free_port()}"
    assert_short_error(daemon.ctl("attach", nobody), 3, f"cannot reach {nobody}")
    assert_short_error(daemon.ctl("detach", "nothing"), 1, "no external server nothing; attached: none")

    assert daemon.ctl("attach", sim.url, "--name", "one").returncode == 0
    assert_short_error(daemon.ctl("attach", sim.url, "--name", "one"), 1, "named one is attached already")
    assert_short_error(daemon.ctl("attach", sim.url, "--name", "two"), 1, f"{sim.url} is attached already, as one")
    (instance,) = launch(daemon, 1, *FAST_SIM, model="m")
    other = Sim().start()
    sims.append(other)
    assert_short_error(daemon.ctl("attach", other.url, "--name", instance), 1, "is the name of an instance")
    assert list(externals(daemon)) == ["one"]
    assert_short_error(daemon.ctl("detach", "two"), 1, "no external server two; attached: one")
    assert sorted(os.listdir(short_tmp / "j-state" / "external")) == ["one.json"]


def test_a_hung_server_is_unhealthy_though_its_health_answers(short_tmp: Path, spawn: Spawn, sims: list[Sim]) -> None:
    # The simulator's engine stops after 3 requests while /health stays 200: the watch's probe requests
    # (one per hang timeout while the counters stand still) hang it, and the next probe goes unanswered.
    sim = Sim("--hang-after-requests", "3").start()
    sims.append(sim)
    daemon = spawn(daemon_args(short_tmp, "--hang-timeout", "1"))
    assert daemon.ctl("attach", sim.url, "--name", "hangs").returncode == 0
    assert httpx.get(f"{sim.url}/health", timeout=5).status_code == 200
    found = wait_state(daemon, "hangs", "UNHEALTHY")
    assert "a probe request went unanswered" in found["message"], found
    assert httpx.get(f"{sim.url}/health", timeout=5).status_code == 200
    wait_served(front_door(daemon), [])
