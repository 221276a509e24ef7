"""Instances under mvllmd's built-in process supervisor, with mvllm-sim engines: the whole flow, real
processes and sockets. The same flow under systemd is in test_systemd_instances.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemonkit import MVLLMCTL, DaemonProcess, Spawn, instance_status, wait_for

SIM_ARGS = ("--", "--time-scale", "0")  # engine arguments: answer at once


@pytest.fixture
def sup(short_tmp: Path, spawn: Spawn) -> DaemonProcess:
    args = ["--listen", f"unix:{short_tmp}/m.sock", "--state-dir", str(short_tmp / "state"), "--sim-gpus", "4",
            "--unit-manager", "process", "--probe-interval", "0.2",
            "--vllm-python", str(short_tmp / "no-such-venv" / "bin" / "python")]  # fmt: skip
    return spawn(args)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


def launch_two(daemon: DaemonProcess) -> list[dict[str, Any]]:
    done = daemon.ctl("launch", "sim-model", "--engine", "sim", "-n", "2", *SIM_ARGS)
    assert done.returncode == 0, done.stderr
    assert "URLs: " in done.stdout
    instances = instance_status(daemon.ctl)
    assert [i["state"] for i in instances] == ["INSTANCE_STATE_READY"] * 2
    # The seed script's command line, as mvllmctl runs it, with the URLs of both.
    urls = ",".join(f"{i['url']}/v1" for i in instances)
    assert f'mvllmctl generate-rollouts --use_vllm --vllm_base_url "{urls}" \\\n' in done.stdout
    assert "--model_path sim-model --data_path data.parquet --output_path rollouts.parquet" in done.stdout
    return instances


def test_launch_serve_restart_stop(sup: DaemonProcess) -> None:
    instances = launch_two(sup)
    assert [i["name"] for i in instances] == ["sim-model-0", "sim-model-1"]
    assert [i["devices"] for i in instances] == [["sim-gpu:0"], ["sim-gpu:1"]]
    for inst in instances:
        assert inst["url"].startswith("http://127.0.0.1:")
        reply = httpx.post(
            f"{inst['url']}/v1/completions", json={"model": "sim-model", "prompt": "hi", "max_tokens": 3}
        )
        assert reply.status_code == 200
    devices = json.loads(sup.ctl("devices", "--json").stdout)["devices"]
    assert [d["instance"] for d in devices] == ["sim-model-0", "sim-model-1", "", ""]

    # kill -9 the engine: the monitor sees it, starts it again, and it is READY again.
    old_pid = instances[0]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(
        lambda: (
            instance_status(sup.ctl)[0]["restarts"] == 1
            and instance_status(sup.ctl)[0]["state"] == "INSTANCE_STATE_READY"
        )
    )
    assert instance_status(sup.ctl)[0]["pid"] != old_pid

    pids = [i["pid"] for i in instance_status(sup.ctl)]
    done = sup.ctl("stop", "--all")
    assert done.returncode == 0, done.stderr
    assert instance_status(sup.ctl) == []
    assert not any(alive(pid) for pid in pids)
    devices = json.loads(sup.ctl("devices", "--json").stdout)["devices"]
    assert all(d["instance"] == "" for d in devices)


def test_daemon_killed_and_restarted_readopts(sup: DaemonProcess, spawn: Spawn, short_tmp: Path) -> None:
    before = launch_two(sup)
    sup.proc.send_signal(signal.SIGKILL)
    sup.proc.wait()
    assert all(alive(i["pid"]) for i in before)  # the engines outlive the daemon...
    again = spawn(sup.argv[1:])
    wait_for(lambda: [i["state"] for i in instance_status(again.ctl)] == ["INSTANCE_STATE_READY"] * 2)
    after = instance_status(again.ctl)
    assert [i["pid"] for i in after] == [i["pid"] for i in before]  # ...and are adopted, not doubled
    assert again.ctl("stop", "--all").returncode == 0
    assert not any(alive(i["pid"]) for i in before)


def test_clean_daemon_stop_stops_its_engines(sup: DaemonProcess) -> None:
    pids = [i["pid"] for i in launch_two(sup)]
    assert sup.stop() == 0
    assert not any(alive(pid) for pid in pids)


def test_a_request_that_does_not_fit(sup: DaemonProcess, short_tmp: Path) -> None:
    done = sup.ctl("launch", "m", "--engine", "sim", "-n", "3", "--tp", "2", *SIM_ARGS)
    assert done.returncode == 4
    assert "3 x TP2 needs 6 sim-gpus; 4 free: free 0-3" in done.stderr
    assert instance_status(sup.ctl) == []
    assert list((short_tmp / "state" / "instances").glob("*.json")) == []  # nothing half-started


def test_explicit_devices_overlapping_a_running_instance(sup: DaemonProcess) -> None:
    assert sup.ctl("launch", "a", "--engine", "sim", "--tp", "2", "--devices", "0-1", *SIM_ARGS).returncode == 0
    done = sup.ctl("launch", "b", "--engine", "sim", "--tp", "2", "--devices", "1-2", *SIM_ARGS)
    assert done.returncode == 1
    assert "sim-gpu 1 is held by instance a-0" in done.stderr
    assert [i["name"] for i in instance_status(sup.ctl)] == ["a-0"]
    assert sup.ctl("info").returncode == 0


def test_model_string_with_shell_and_systemd_characters(sup: DaemonProcess) -> None:
    model = 'org/we"ird; $HOME %d\nmodel'
    done = sup.ctl("launch", model, "--engine", "sim", *SIM_ARGS)
    assert done.returncode == 0, done.stderr
    (inst,) = instance_status(sup.ctl)
    assert inst["name"] == "we-ird-home-d-model-0"
    assert inst["model"] == model  # reached the engine as one argv word, unchanged
    listed = httpx.get(f"{inst['url']}/v1/models").json()["data"]
    assert [m["id"] for m in listed] == [model]


def test_missing_engine_interpreter(sup: DaemonProcess, short_tmp: Path) -> None:
    done = sup.ctl("launch", "org/model", "--cpu")
    assert done.returncode == 2
    assert f"the vLLM interpreter {short_tmp}/no-such-venv/bin/python does not exist" in done.stderr
    assert instance_status(sup.ctl) == []


def test_an_engine_that_exits_at_once(sup: DaemonProcess) -> None:
    done = sup.ctl("launch", "m", "--engine", "sim", "--", "--tensor-parallel-size", "3")
    assert done.returncode == 1
    assert "the engine exited before it was ever ready" in done.stderr
    assert "--tensor-parallel-size 3 is not modelled" in done.stderr  # the engine's own words, from its log
    (inst,) = instance_status(sup.ctl)
    assert inst["state"] == "INSTANCE_STATE_FAILED"
    assert "exited with status 2" in inst["message"]
    devices = json.loads(sup.ctl("devices", "--json").stdout)["devices"]
    assert all(d["instance"] == "" for d in devices)  # a failed instance holds no device
    assert sup.ctl("stop", "m-0").returncode == 0
    assert sup.ctl("info").returncode == 0


def test_logs(sup: DaemonProcess) -> None:
    launch_two(sup)
    done = sup.ctl("logs", "sim-model-0", "--tail", "5")
    assert done.returncode == 0, done.stderr
    assert "mvllm-sim serving sim-model" in done.stdout
    missing = sup.ctl("logs", "nope-0")
    assert missing.returncode == 1
    assert "no instance nope-0" in missing.stderr


def test_a_hung_engine_is_unhealthy_then_restarted(short_tmp: Path, spawn: Spawn) -> None:
    args = ["--listen", f"unix:{short_tmp}/h.sock", "--state-dir", str(short_tmp / "hstate"), "--sim-gpus", "1",
            "--unit-manager", "process", "--probe-interval", "0.2", "--hang-timeout", "1"]  # fmt: skip
    daemon = spawn(args)
    # The engine stops stepping at its first request, as a vLLM whose worker is stuck: /health stays 200.
    done = daemon.ctl("launch", "m", "--engine", "sim", "--", "--time-scale", "0", "--hang-after-requests", "1")
    assert done.returncode == 0, done.stderr
    seen: set[str] = set()

    def restarted() -> bool:
        (inst,) = instance_status(daemon.ctl)
        seen.add(inst["state"])
        return inst["restarts"] >= 1 and inst["state"] == "INSTANCE_STATE_READY"

    wait_for(restarted)
    assert "INSTANCE_STATE_UNHEALTHY" in seen


def test_logs_follow_until_interrupted(sup: DaemonProcess) -> None:
    launch_two(sup)
    follower = subprocess.Popen(
        [MVLLMCTL, "--address", sup.address, "logs", "sim-model-1", "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=sup.env,
    )
    assert follower.stdout is not None
    assert "mvllm-sim serving sim-model" in follower.stdout.readline()
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=30)
    assert follower.returncode == 130
    assert "interrupted" in err and "Traceback" not in err


def test_api_key_reaches_the_engine_but_not_its_command_line(sup: DaemonProcess) -> None:
    done = sup.ctl("launch", "k", "--engine", "sim", "--api-key", "s3cret-key", *SIM_ARGS)
    assert done.returncode == 0, done.stderr  # READY: the daemon's probes used the key
    (inst,) = instance_status(sup.ctl)
    assert b"s3cret-key" not in Path(f"/proc/{inst['pid']}/cmdline").read_bytes()
    body = {"model": "k", "prompt": "hi", "max_tokens": 1}
    assert httpx.post(f"{inst['url']}/v1/completions", json=body).status_code == 401
    headers = {"Authorization": "Bearer s3cret-key"}
    assert httpx.post(f"{inst['url']}/v1/completions", json=body, headers=headers).status_code == 200
