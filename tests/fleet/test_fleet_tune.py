"""`mvllmctl tune --hosts`: a sweep shared among alike fleet hosts (mvllm-sim on simulated GPUs), each host
measuring its share of the splits at once: the merged table and recommendation, --apply on every host,
hosts that are not alike refused, a model that fits nowhere (exit 4, from a peer too), Ctrl-C, and a
host that dies mid-sweep.

Hosts 1 and 2 have two simulated GPUs each; host 3 has four, so it is not like them."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import hostkit
from daemonkit import MVLLMCTL, assert_short_error, wait_for
from fleetkit import FleetDaemon, coordinated

pytestmark = pytest.mark.skipif(hostkit.available() is not None, reason=str(hostkit.available()))

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"
SMALL, LARGE = str(MODELS / "llama-3.1-8b"), str(MODELS / "llama-3.1-70b")
SWEEP = ("--engine", "sim", "--max-num-seqs", "32")
SIM = ("--", "--profile", "h100-8b", "--time-scale", "1")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[FleetDaemon]]:
    with coordinated(tmp_path_factory.mktemp("fleet"), 3, extra={2: ["--sim-gpus", "4"]}) as daemons:  # not alike
        yield daemons


def _json(daemon: FleetDaemon, *args: str) -> Any:
    done = daemon.ctl(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _everywhere(daemon: FleetDaemon) -> list[tuple[str, str, str, bool]]:
    """Every instance of every host: HOST/NAME, its state, its devices, whether a trial's."""
    instances = _json(daemon, "status", "--hosts", "all").get("instances", [])
    return sorted((f"{i['fleet_host']}/{i['name']}", i["state"].removeprefix("INSTANCE_STATE_"),
                   ",".join(i["devices"]), i["trial"]) for i in instances)  # fmt: skip


def test_two_hosts_share_the_sweep_and_apply_it_on_both(coordinator: FleetDaemon) -> None:
    """The two splits of two GPUs, one on each host at once, each with the whole budget; the merged report
    says who measured what, recommends 2 x TP1 (as on one host: tests/tune/test_tune_sim.py) and, with
    --apply, leaves it running on both hosts; nothing of the trials is left."""
    done = coordinator.ctl("tune", SMALL, *SWEEP, "--hosts", "host-1,host-2", "--budget", "20", "--apply", "--json",
                           *SIM, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["report"]
    trials = report["trials"]
    assert report["fleet_hosts"] == ["host-1", "host-2"]
    assert [(t["split"]["instances"], t["split"]["tensor_parallel_size"], t["fleet_host"]) for t in trials] == [
        (2, 1, "host-1"), (1, 2, "host-2")]  # fmt: skip
    assert [t["phase"] for t in trials] == ["TRIAL_PHASE_DONE"] * 2
    assert report["clock"] == "TUNE_CLOCK_SIMULATED" and report["complete"] and report["best"] == 0
    assert trials[0]["tokens_per_second"] > trials[1]["tokens_per_second"] > 0
    assert trials[1]["speedup"] == 1.0 and trials[0]["speedup"] > 1.0
    assert all(len(t["interval_tokens_per_second"]) >= 8 for t in trials)  # each had the whole budget
    assert report["recommendation"].startswith("2 x TP1: ")
    applied = ["host-1/llama-3-1-8b-0", "host-1/llama-3-1-8b-1", "host-2/llama-3-1-8b-0", "host-2/llama-3-1-8b-1"]
    assert report["applied_instances"] == applied
    assert _everywhere(coordinator) == [(name, "READY", f"sim-gpu:{name[-1]}", False) for name in applied]
    shown = coordinator.ctl("tune", "--show")  # the merged report, kept by the coordinator
    assert shown.returncode == 0, shown.stderr
    header, best = shown.stdout.splitlines()[:2]
    assert header.split()[:2] == ["CONFIGURATION", "HOST"] and best.split()[:5] == ["2", "x", "TP1", "*", "host-1"]
    assert "on 2 sim-gpus of each of host-1, host-2" in shown.stdout


def test_hosts_that_are_not_alike_are_refused(coordinator: FleetDaemon) -> None:
    done = coordinator.ctl("tune", SMALL, *SWEEP, "--hosts", "host-1,host-3", "--budget", "20", *SIM)
    assert_short_error(done, 2, "alike hosts, and host-1 and host-3 are not: 2 sim-gpus (2 x TP1 fits",
                       "on host-1, 4 sim-gpus (4 x TP1 fits")  # fmt: skip
    assert _everywhere(coordinator) == []


def test_a_model_that_fits_nowhere_exits_4_from_a_peer_too(coordinator: FleetDaemon) -> None:
    """141 GB of weights do not fit TP 1 on an 80 GB GPU: every host says so before anything starts; the
    exit status stays 4 when the only host asked is a peer."""
    for hosts in ("host-1,host-2", "host-2"):
        done = coordinator.ctl("tune", LARGE, *SWEEP, "--hosts", hosts, "--configs", "2x1", *SIM)
        assert_short_error(done, 4, f"nothing was started: {hosts.replace(',', ', ')}: ", "need TP 2 or more")
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert _everywhere(coordinator) == []


def test_ctrl_c_stops_every_hosts_trial(coordinator: FleetDaemon, tmp_path: Path) -> None:
    """SIGINT while both hosts measure: every host stops its trial; mvllmctl waits until no trial instance
    is left on any host, and exits 130."""
    data = tmp_path / "prompts.parquet"  # the same path on every host (only the state is a host's own)
    pq.write_table(pa.table({"prompt": [f"question {i}" for i in range(5000)]}), data)
    with _both_measuring(coordinator, "--data", str(data), "--budget", "300") as tune:
        tune.send_signal(signal.SIGINT)
        said = tune.communicate(timeout=60)[1]
    assert tune.returncode == 130, said
    assert "removing its instances" in said
    assert _everywhere(coordinator) == []


def test_a_host_that_dies_mid_sweep_fails_its_own_trial(fleet: list[FleetDaemon], coordinator: FleetDaemon) -> None:
    """Host 2's mvllmd and engines killed (-9) while both hosts measure: its trial fails, saying which host
    went away; host 1's is measured and recommended; the report says the sweep did not run to its end.
    (Last: host 2 is started again after.)"""
    second = fleet[1]
    with _both_measuring(coordinator, "--budget", "30", "--json") as tune:
        second.kill_host()
        out, said = tune.communicate(timeout=120)
    assert tune.returncode == 0, said
    report = json.loads(out)["report"]
    mine, lost = report["trials"]
    assert (mine["phase"], lost["phase"]) == ("TRIAL_PHASE_DONE", "TRIAL_PHASE_FAILED"), said
    assert lost["fleet_host"] == "host-2" and lost["message"].startswith("host host-2 at "), lost["message"]
    assert report["best"] == 0 and not report["complete"]
    second.start()  # it removes the trial's instances it finds in its state (their engines died with it)
    wait_for(lambda: coordinator.ctl("hosts").returncode == 0, timeout=60)  # exit 1 while a host is unreachable
    wait_for(lambda: _everywhere(coordinator) == [], timeout=30)


@contextlib.contextmanager
def _both_measuring(coordinator: FleetDaemon, *options: str) -> Iterator[subprocess.Popen[str]]:
    """`mvllmctl tune` over hosts 1 and 2 in the background, once both hosts' trials measure."""
    assert coordinator.daemon is not None
    argv = [MVLLMCTL, "--address", coordinator.daemon.address, "tune", SMALL, *SWEEP, "--hosts", "host-1,host-2",
            *options, *SIM]  # fmt: skip
    with subprocess.Popen(argv, env=coordinator.daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as tune:  # fmt: skip
        try:
            assert tune.stderr is not None
            warming: set[str] = set()
            deadline = time.monotonic() + 120
            for line in tune.stderr:  # a line per trial and phase, e.g. "1 x TP2 on host-2: warming up"
                if "warming up" in line:
                    warming.add(line.split(":")[0])
                if len(warming) == 2:
                    break
                assert time.monotonic() < deadline and tune.poll() is None, line
            assert warming == {"2 x TP1 on host-1", "1 x TP2 on host-2"}
            assert {(n.split("/")[0], trial) for n, _, _, trial in _everywhere(coordinator)} == {
                ("host-1", True), ("host-2", True)}  # fmt: skip
            yield tune
        finally:
            if tune.poll() is None:  # the test failed first: its call ends, and the daemons stop the sweep
                tune.kill()
