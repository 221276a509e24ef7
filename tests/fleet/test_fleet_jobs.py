"""A fleet of three hosts on one machine (hostkit: network namespaces on a bridge, a file system each),
each with its own mvllmd and simulated GPUs, certificates from `mvllmd certs`. Host 1 coordinates: its
jobs run on its own instances and, through their per-instance routes, on those of hosts 2 and 3. A peer
killed, a peer's link cut and restored, the coordinator killed: every (prompt, sample) once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import hostkit
from daemonkit import wait_for
from fleetkit import FleetDaemon, make_pki
from jobkit import assert_each_pair_once, progress, submit, wait_ended, wait_samples, write_prompts

pytestmark = pytest.mark.skipif(hostkit.available() is not None, reason=str(hostkit.available()))

# A 400 x 4 job takes several seconds over six instances: room to break a host mid-way.
SIM = ("--time-scale", "1", "--max-num-seqs", "16")
PROMPTS, K = 400, 4
JOB = ("-k", str(K), "--max-tokens", "64", "--model", "m")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[FleetDaemon]]:
    tmp = tmp_path_factory.mktemp("fleet")
    with hostkit.Fleet(3) as hosts:
        pki = make_pki(tmp / "pki", hosts.hosts)
        first, second, third = (FleetDaemon(h, pki, tmp) for h in hosts.hosts)
        first.extra = ["--fleet-host", f"{second.host.name}={second.address}"]  # host 3 joins by `hosts add`
        daemons = [first, second, third]
        try:
            for daemon in reversed(daemons):
                daemon.start()
            for daemon in daemons:
                launch(daemon)
            added = first.ctl("hosts", "add", third.host.name, third.address)
            assert added.returncode == 0, added.stderr
            assert added.stdout.strip() == f"added host-3 at {third.address}: reachable"
            wait_for(lambda: len(reachable_peers(first)) == 2, timeout=30)
            yield daemons
        finally:
            for daemon in daemons:
                daemon.stop()


def launch(daemon: FleetDaemon) -> None:
    done = daemon.ctl("launch", "m", "--engine", "sim", "-n", "2", "--max-num-seqs", "16", "--", *SIM[:2])
    assert done.returncode == 0, done.stderr


def hosts(daemon: FleetDaemon) -> list[dict[str, Any]]:
    done = daemon.ctl("hosts", "--json")
    listed: list[dict[str, Any]] = json.loads(done.stdout)["hosts"]
    return listed


def reachable_peers(coordinator: FleetDaemon) -> list[str]:
    return sorted(h["name"] for h in hosts(coordinator) if h["reachable"] and not h["local"])


def endpoint_samples(coordinator: FleetDaemon, job_id: str) -> dict[str, int]:
    assert coordinator.daemon is not None
    return {e.instance: e.completed for e in progress(coordinator.daemon, job_id).endpoints}


def run_job(coordinator: FleetDaemon, tmp: Path, name: str, prompts: int = PROMPTS) -> str:
    assert coordinator.daemon is not None
    data = write_prompts(tmp / f"{name}.parquet", prompts)
    return submit(coordinator.daemon, data, tmp / f"{name}-out.parquet", *JOB)


def finished(coordinator: FleetDaemon, tmp: Path, name: str, job_id: str, prompts: int = PROMPTS) -> None:
    assert coordinator.daemon is not None
    ended = wait_ended(coordinator.daemon, job_id, timeout=180)
    assert ended["state"] == "JOB_STATE_SUCCEEDED", (ended, coordinator.daemon.stderr[-3000:])
    assert_each_pair_once(pq.read_table(tmp / f"{name}-out.parquet"), prompts, K)


def test_hosts_lists_the_fleet(fleet: list[FleetDaemon]) -> None:
    first = fleet[0]
    listed = hosts(first)
    assert [(h["name"], h["local"], h["reachable"], h["source"]) for h in listed] == [
        ("host-1", True, True, ""), ("host-2", False, True, "config"), ("host-3", False, True, "added"),
    ]  # fmt: skip
    assert all(h["gpus_total"] == 2 and h["gpus_free"] == 0 and h["instances"] == 2 for h in listed), listed
    over_tls = first.remote_ctl("hosts")  # a user's certificate may list them
    assert over_tls.returncode == 0, over_tls.stderr
    assert "host-3" in over_tls.stdout


def test_hosts_removed_and_added_again(fleet: list[FleetDaemon]) -> None:
    first, third = fleet[0], fleet[2]
    configured = first.ctl("hosts", "remove", "host-2")
    assert configured.returncode == 1, configured.stderr
    assert "comes from the config file ([[fleet.hosts]]): remove it there" in configured.stderr
    removed = first.ctl("hosts", "remove", "host-3")
    assert removed.returncode == 0, removed.stderr
    assert [h["name"] for h in hosts(first)] == ["host-1", "host-2"]
    wait_for(lambda: len(reachable_peers(first)) == 1, timeout=30)
    for args, code, says in (
        (("host-9", "nowhere"), 2, "must be its gRPC address HOST:PORT"),
        (("host-1", third.address), 2, "this host's own name"),
        (("host-2", third.address), 1, "already a peer"),
        (("bad name!", third.address), 2, "expected [A-Za-z0-9]"),
    ):
        refused = first.ctl("hosts", "add", *args)
        assert refused.returncode == code and says in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr
    again = first.ctl("hosts", "add", "host-3", third.address)
    assert again.returncode == 0, again.stderr
    wait_for(lambda: len(reachable_peers(first)) == 2, timeout=30)


def test_a_job_runs_on_every_host(fleet: list[FleetDaemon], tmp_path: Path) -> None:
    first = fleet[0]
    job_id = run_job(first, tmp_path, "all", prompts=200)
    finished(first, tmp_path, "all", job_id, prompts=200)
    samples = endpoint_samples(first, job_id)
    assert sorted(samples) == ["host-2/m-0", "host-2/m-1", "host-3/m-0", "host-3/m-1", "m-0", "m-1"], samples
    assert all(n > 0 for n in samples.values()), samples
    assert sum(samples.values()) == 200 * K


def test_a_peer_killed_mid_job(fleet: list[FleetDaemon], tmp_path: Path) -> None:
    first, third = fleet[0], fleet[2]
    assert first.daemon is not None
    job_id = run_job(first, tmp_path, "killed")
    wait_samples(first.daemon, job_id, PROMPTS)
    third.kill_host()
    finished(first, tmp_path, "killed", job_id)
    lost = [h for h in hosts(first) if h["name"] == "host-3"]
    assert lost[0]["reachable"] is False, lost
    third.start()  # its instances start again from their specs, and rejoin
    wait_for(lambda: all(h["reachable"] for h in hosts(first)), timeout=60)
    after = run_job(first, tmp_path, "after", prompts=100)
    wait_for(lambda: any(n > 0 for e, n in endpoint_samples(first, after).items() if e.startswith("host-3/")), 90)
    finished(first, tmp_path, "after", after, prompts=100)


def test_a_peer_cut_off_and_back(fleet: list[FleetDaemon], tmp_path: Path) -> None:
    first, second = fleet[0], fleet[1]
    assert first.daemon is not None
    job_id = run_job(first, tmp_path, "cut")
    wait_samples(first.daemon, job_id, PROMPTS)
    second.host.link_down()
    try:
        wait_for(lambda: not next(h for h in hosts(first) if h["name"] == "host-2")["reachable"], timeout=30)
    finally:
        second.host.link_up()
    finished(first, tmp_path, "cut", job_id)
    wait_for(lambda: all(h["reachable"] for h in hosts(first)), timeout=60)
    after = run_job(first, tmp_path, "back", prompts=100)
    wait_for(lambda: any(n > 0 for e, n in endpoint_samples(first, after).items() if e.startswith("host-2/")), 90)
    finished(first, tmp_path, "back", after, prompts=100)


def test_the_coordinator_killed_and_started_again(fleet: list[FleetDaemon], tmp_path: Path) -> None:
    first = fleet[0]
    assert first.daemon is not None
    job_id = run_job(first, tmp_path, "coordinator")
    wait_samples(first.daemon, job_id, PROMPTS)
    first.daemon.proc.kill()
    first.daemon.proc.wait(30)
    first.start()  # its peers are its config's and the one added (kept in its state directory)
    finished(first, tmp_path, "coordinator", job_id)
    assert [h["reachable"] for h in hosts(first)] == [True, True, True]
