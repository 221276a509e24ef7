"""Launching, listing and stopping across the fleet from one daemon (host 1): placement packed and
spread over two peers, checked whole before anything starts, per-host failures named; `status`,
`devices`, `logs` and `stop` with --hosts and HOST/NAME; weights updated across two peers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from mvllm_sim.weights import make_checkpoint

import hostkit
from daemonkit import wait_for
from fleetkit import FleetDaemon, coordinated

pytestmark = pytest.mark.skipif(hostkit.available() is not None, reason=str(hostkit.available()))

PEERS = "host-2,host-3"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[FleetDaemon]]:
    with coordinated(tmp_path_factory.mktemp("fleet"), 3) as daemons:
        yield daemons


def listed(daemon: FleetDaemon, *args: str) -> list[dict[str, Any]]:
    done = daemon.ctl(*args, "--json")
    assert done.returncode == 0, done.stderr
    key = {"hosts": "hosts", "status": "instances", "devices": "devices"}[args[0]]
    found: list[dict[str, Any]] = json.loads(done.stdout).get(key, [])
    return found


def placed(daemon: FleetDaemon) -> list[str]:
    return sorted(f"{i['fleet_host']}/{i['name']}" for i in listed(daemon, "status", "--hosts", "all"))


def launch(daemon: FleetDaemon, *args: str) -> Any:
    return daemon.ctl("launch", "m", "--engine", "sim", *args, "--", "--time-scale", "0.01")


def test_packed_fills_each_host_in_turn(coordinator: FleetDaemon) -> None:
    done = launch(coordinator, "-n", "3", "--hosts", PEERS)
    assert done.returncode == 0, done.stderr
    assert placed(coordinator) == ["host-2/m-0", "host-2/m-1", "host-3/m-0"]
    assert "host-2/m-0  READY" in done.stdout


def test_spread_goes_round_the_hosts(coordinator: FleetDaemon) -> None:
    done = launch(coordinator, "-n", "2", "--hosts", PEERS, "--spread")
    assert done.returncode == 0, done.stderr
    assert placed(coordinator) == ["host-2/m-0", "host-3/m-0"]


def test_all_hosts_and_the_listings(coordinator: FleetDaemon) -> None:
    done = launch(coordinator, "-n", "3", "--hosts", "all", "--spread")
    assert done.returncode == 0, done.stderr
    assert placed(coordinator) == ["host-1/m-0", "host-2/m-0", "host-3/m-0"]
    table = coordinator.ctl("status", "--hosts", "all").stdout
    assert "host-2/m-0" in table and "host-1/m-0" in table
    devices = listed(coordinator, "devices", "--hosts", "host-3")
    assert [(d["fleet_host"], d["instance"]) for d in devices] == [("host-3", "m-0"), ("host-3", "")]
    mine = listed(coordinator, "status")  # this host alone, by default
    assert [(i["fleet_host"], i["name"]) for i in mine] == [("host-1", "m-0")]
    logs = coordinator.ctl("logs", "host-2/m-0")
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.strip()
    stopped = coordinator.ctl("stop", "host-2/m-0")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == "stopped host-2/m-0"
    assert placed(coordinator) == ["host-1/m-0", "host-3/m-0"]


def test_a_launch_that_does_not_fit_starts_nothing(coordinator: FleetDaemon) -> None:
    done = launch(coordinator, "-n", "5", "--hosts", PEERS)
    assert done.returncode == 4, done.stderr
    assert "host-2 room for 2, host-3 room for 2" in done.stderr
    assert "nothing was started" in done.stderr
    assert placed(coordinator) == []


def test_a_model_path_missing_on_one_host_starts_nothing(fleet: list[FleetDaemon], coordinator: FleetDaemon) -> None:
    second = fleet[1]
    model = second.host.private / "models" / "tiny"
    made = second.host.run(["mkdir", "-p", str(model)])  # on host 2 only: host 3 has its own file system
    assert made.returncode == 0, made.stderr
    done = coordinator.ctl("launch", str(model), "--engine", "sim", "-n", "2", "--hosts", PEERS, "--spread")
    assert done.returncode == 2, done.stderr
    assert f"host-3: the model path {model} does not exist on this host" in done.stderr
    assert "nothing was started" in done.stderr
    assert placed(coordinator) == []


def test_a_host_that_fails_mid_launch_is_named(fleet: list[FleetDaemon], coordinator: FleetDaemon) -> None:
    third = fleet[2]
    # Host 3 passes the check (it writes nothing), then cannot write its instance's spec.
    specs = str(third.host.private / "state" / "instances")
    for argv in (["mkdir", "-p", specs], ["mount", "--bind", specs, specs], ["mount", "-o", "remount,bind,ro", specs]):
        done = third.host.run(argv)
        assert done.returncode == 0, done.stderr
    try:
        done = launch(coordinator, "-n", "2", "--hosts", PEERS, "--spread")
    finally:
        assert third.host.run(["umount", specs]).returncode == 0
    assert done.returncode == 1, done.stderr
    assert "host-3: launch failed:" in done.stderr
    assert "read-only file system" in done.stderr
    assert placed(coordinator) == ["host-2/m-0"]  # the other host's instance runs


def test_weights_updated_across_hosts(fleet: list[FleetDaemon], coordinator: FleetDaemon) -> None:
    second, third = fleet[1], fleet[2]
    base = second.host.private / "ckpt"  # the same paths on both peers, each on its own file system
    for peer in (second, third):
        for name, tag in (("a", 4), ("b", 11)):
            make_checkpoint(peer.host.inside(base / name), tag)
    make_checkpoint(second.host.inside(base / "c"), 13)  # on host 2 only
    a = str(base / "a")
    for peer, faults in ((second, ()), (third, ("--fail-reloads",))):
        done = peer.ctl("launch", a, "--engine", "sim", "--name", "w", "--weight-updates", "--", "--time-scale",
                        "0.01", *faults)  # fmt: skip
        assert done.returncode == 0, done.stderr

    def versions() -> dict[str, str]:
        return {f"{i['fleet_host']}/{i['name']}": i["weight_version"] for i in listed(coordinator, "status",
                                                                                       "--hosts", PEERS)}  # fmt: skip

    missing = coordinator.ctl("weights", "update", a, "--path", str(base / "c"), "--hosts", PEERS)
    assert missing.returncode == 2, missing.stderr
    assert "checked on every host first, and nothing was changed: host-3: --path" in missing.stderr
    assert versions() == {"host-2/w-0": "a", "host-3/w-0": "a"}

    done = coordinator.ctl("weights", "update", a, "--path", str(base / "b"), "--hosts", PEERS, "--json")
    assert done.returncode == 1, done.stderr
    steps = {f"{i['fleet_host']}/{i['name']}": i for i in json.loads(done.stdout)["instances"]}
    assert steps["host-2/w-0"]["step"] == "UPDATE_STEP_DONE"
    assert steps["host-3/w-0"]["step"] == "UPDATE_STEP_FAILED"
    assert "restarted on the new weights" in steps["host-3/w-0"]["error"]
    wait_for(lambda: versions() == {"host-2/w-0": "b", "host-3/w-0": "b"}, timeout=30)
