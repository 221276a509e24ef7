"""Instances as real systemd units (mvllm-instance@NAME.service) under a real systemd user manager,
with mvllmd itself running as a unit of that manager. Engines: mvllm-sim here; the real vLLM CPU build
in test_vllm_instances.py."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemonkit import instance_status, wait_for
from usermanager import UserManager

pytestmark = pytest.mark.systemd
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def manager(user_manager: UserManager) -> UserManager:
    return user_manager


@pytest.fixture
def mvllmd(manager: UserManager, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """mvllmd as a unit of the user manager; yields `ctl(*args)` that runs mvllmctl inside."""
    config = tmp_path / "mvllmd.toml"
    config.write_text(
        "[inventory]\nsim_gpus = 4\n[instances]\nprobe_interval_s = 0.2\nport_base = 18700\nhang_timeout_s = 1.0\n"
        '[http]\nlisten = ["http://127.0.0.1:0"]\n'  # the default port is one per machine
    )
    done = manager.run([str(BIN / "mvllmd"), "install-units", "--user", "--runtime", "--config", str(config)])
    assert done.returncode == 0, done.stderr
    assert manager.systemctl("start", "mvllmd").returncode == 0, manager.log()

    def ctl(*args: str) -> Any:
        return manager.run([str(BIN / "mvllmctl"), *args], timeout=120)

    yield ctl
    ctl("stop", "--all", "--force")
    manager.systemctl("stop", "mvllmd")


def unit_state(manager: UserManager, unit: str) -> dict[str, str]:
    out = manager.systemctl("show", "-p", "ActiveState,SubState,MainPID,LoadState", unit).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_sim_instances_as_units(manager: UserManager, mvllmd: Callable[..., Any]) -> None:
    ctl = mvllmd
    assert json.loads(ctl("info", "--json").stdout)["unit_manager"] == "UNIT_MANAGER_SYSTEMD_USER"
    model = 'org/odd "name"; $HOME %i'
    done = ctl("launch", model, "--engine", "sim", "-n", "2", "--name", "sim", "--", "--time-scale", "0")
    assert done.returncode == 0, done.stderr + manager.log()[-3000:]
    instances = instance_status(ctl)
    assert [i["unit"] for i in instances] == ["mvllm-instance@sim-0.service", "mvllm-instance@sim-1.service"]
    for inst in instances:
        assert unit_state(manager, inst["unit"])["ActiveState"] == "active"
        reply = httpx.post(f"{inst['url']}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
        assert reply.status_code == 200
    # The model string went to the engine through the spec, never into the unit file.
    template = manager.read_file(manager.unit_dir / "mvllm-instance@.service")
    assert "odd" not in template and "$HOME" not in template

    # kill -9 the unit's main process: detected, started again, READY again.
    unit = instances[0]["unit"]
    old_pid = int(unit_state(manager, unit)["MainPID"])
    assert old_pid == instances[0]["pid"]
    manager.run(["kill", "-9", str(old_pid)])
    wait_for(
        lambda: instance_status(ctl)[0]["restarts"] == 1 and instance_status(ctl)[0]["state"] == "INSTANCE_STATE_READY"
    )
    assert int(unit_state(manager, unit)["MainPID"]) not in (0, old_pid)

    # The daemon restarts; the units keep running and are re-adopted.
    pids = [i["pid"] for i in instance_status(ctl)]
    assert manager.systemctl("restart", "mvllmd").returncode == 0
    wait_for(lambda: [i["state"] for i in instance_status(ctl)] == ["INSTANCE_STATE_READY"] * 2)
    assert [i["pid"] for i in instance_status(ctl)] == pids

    assert ctl("stop", "--all").returncode == 0
    for inst in instances:
        assert unit_state(manager, inst["unit"])["ActiveState"] == "inactive"
    assert instance_status(ctl) == []
    devices = json.loads(ctl("devices", "--json").stdout)["devices"]
    assert all(d["instance"] == "" for d in devices)


def test_the_target_stops_them_all(manager: UserManager, mvllmd: Callable[..., Any]) -> None:
    ctl = mvllmd
    assert ctl("launch", "m", "--engine", "sim", "-n", "2", "--", "--time-scale", "0").returncode == 0
    assert manager.systemctl("stop", "mvllm-instances.target").returncode == 0
    # systemctl waits for the target's own stop job; the PartOf= stops it propagates finish on their own.
    for name in ("m-0", "m-1"):
        unit = f"mvllm-instance@{name}.service"
        wait_for(lambda unit=unit: unit_state(manager, unit)["ActiveState"] == "inactive")
    wait_for(lambda: instance_status(ctl) == [])  # stopped on purpose: forgotten, not restarted


def test_an_engine_that_exits_at_once_is_failed(manager: UserManager, mvllmd: Callable[..., Any]) -> None:
    ctl = mvllmd
    done = ctl("launch", "m", "--engine", "sim", "--", "--profile", "no-such-profile")
    assert done.returncode == 1
    assert "unknown profile 'no-such-profile'" in done.stderr
    (inst,) = instance_status(ctl)
    assert inst["state"] == "INSTANCE_STATE_FAILED"
    assert unit_state(manager, inst["unit"])["ActiveState"] in ("failed", "inactive")
    assert ctl("info").returncode == 0


def test_a_hung_unit_is_killed_and_started_again(manager: UserManager, mvllmd: Callable[..., Any]) -> None:
    ctl = mvllmd
    done = ctl("launch", "m", "--engine", "sim", "--", "--time-scale", "0", "--hang-after-requests", "1")
    assert done.returncode == 0, done.stderr
    seen: set[str] = set()

    def restarted() -> bool:
        (inst,) = instance_status(ctl)
        seen.add(inst["state"])
        return inst["restarts"] >= 1 and inst["state"] == "INSTANCE_STATE_READY"

    try:
        wait_for(restarted)
    except AssertionError:
        raise AssertionError(f"states seen {seen}; now {instance_status(ctl)}; log:\n{manager.log()[-4000:]}") from None
    assert "INSTANCE_STATE_UNHEALTHY" in seen
    assert unit_state(manager, "mvllm-instance@m-0.service")["ActiveState"] == "active"
