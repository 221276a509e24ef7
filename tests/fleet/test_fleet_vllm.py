"""A real vLLM engine on a peer host: host 2 (an emulated host) runs the vLLM CPU build with the tiny
model; host 1 coordinates, with a quick simulator of the same served name on its own simulated GPU. A
streamed job on host 1 runs on both, the engine reached only through host 2's per-instance route, and
its tail moves samples running on the slow engine onto the simulator, each continued from the token ids
the engine streamed through the route. Every (prompt, sample) once."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import hostkit
from daemonkit import engine_dir, wait_for
from fleetkit import FleetDaemon, make_pki
from jobkit import assert_each_pair_once, job, submit, wait_ended, write_prompts

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(hostkit.available() is not None, reason=str(hostkit.available()))]

READY_TIMEOUT_S = 420.0
PROMPTS, K = 4, 2
WARM_PROMPTS = 32  # the simulator's job alone: seconds of work, several readings of its /metrics
TOKENS = 1536


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetDaemon, FleetDaemon, str]]:
    engine = engine_dir()
    model = str(engine / "tiny-qwen2")
    tmp = tmp_path_factory.mktemp("fleet")
    with hostkit.Fleet(2) as hosts:
        pki = make_pki(tmp / "pki", hosts.hosts)
        first, second = (FleetDaemon(h, pki, tmp) for h in hosts.hosts)
        first.extra = [f"--fleet-host={second.host.name}={second.address}"]
        second.extra = ["--cpu-slots", "1", "--vllm-python", str(engine / "venv" / "bin" / "python")]
        try:
            second.start()
            first.start()
            # The emulated host reaches no other network: vLLM must not try (the hub, usage stats). Two
            # sequences at a time, on one core (its OpenMP threads bound to CPU 1), -O0 (no torch.compile:
            # READY sooner): its rate stays far below the simulator's, and the rest of the machine keeps
            # a core. (With its default batch on both cores, the rates were close enough that the tail
            # did not move, in two CI runs, and this machine stalled for seconds at a time.)
            launched = second.ctl("launch", model, "--cpu", "--name", "tiny", "--max-num-seqs", "2", "--env",
                                  "VLLM_CPU_KVCACHE_SPACE=1", "--env", "VLLM_CPU_OMP_THREADS_BIND=1",
                                  "--env", "HF_HUB_OFFLINE=1", "--env", "VLLM_NO_USAGE_STATS=1", "--env",
                                  "DO_NOT_TRACK=1", "--wait-timeout", str(READY_TIMEOUT_S), "--", "-O0",
                                  timeout=READY_TIMEOUT_S + 60)  # fmt: skip
            assert launched.returncode == 0, launched.stderr
            # Four sequences at a time: a job of more samples gives the engine its share from the start.
            quick = first.ctl("launch", model, "--engine", "sim", "--name", "quick", "--max-num-seqs", "4", "--",
                              "--time-scale", "0.015")  # fmt: skip
            assert quick.returncode == 0, quick.stderr
            yield first, second, model
        finally:
            first.stop()
            second.stop()


def ready(coordinator: FleetDaemon) -> bool:
    """The peer's engine is READY as the coordinator sees it."""
    done = coordinator.ctl("status", "--hosts", "all", "--json")
    listed = json.loads(done.stdout)["instances"] if done.returncode == 0 else []
    return any(i["name"] == "tiny-0" and i["state"] == "INSTANCE_STATE_READY" for i in listed)


def generated(peer: FleetDaemon) -> float:
    """The tokens the peer's engine generated, from its own /metrics, read on the peer (its loopback)."""
    (url,) = [i["url"] for i in json.loads(peer.ctl("status", "--json").stdout)["instances"]]
    read = peer.host.run([sys.executable, "-c", f"import httpx; print(httpx.get('{url}/metrics').text)"])
    assert read.returncode == 0, read.stderr
    counts = [line.split()[-1] for line in read.stdout.splitlines() if line.startswith("vllm:generation_tokens_total")]
    return sum(float(c) for c in counts)


def test_a_streamed_job_moves_samples_off_a_real_engine_on_a_peer(
    fleet: tuple[FleetDaemon, FleetDaemon, str], tmp_path: Path
) -> None:
    first, second, model = fleet
    assert first.daemon is not None
    wait_for(lambda: ready(first), 60)
    data = write_prompts(tmp_path / "prompts.parquet", PROMPTS)
    sampling = ["-k", str(K), "--max-tokens", str(TOKENS), "--temperature", "1", "--model", model,
                "--extra-body", '{"ignore_eos": true}']  # fmt: skip
    # First a job on the simulator alone, so that its rate is known (the front door keeps its endpoint
    # and gauges) before the job that uses both. Otherwise the simulator may finish its share between
    # two readings of its /metrics on a loaded machine, and a server's rate unknown moves nothing.
    (quick,) = [i["url"] for i in json.loads(first.ctl("status", "--json").stdout)["instances"]]
    warm_data = write_prompts(tmp_path / "warm.parquet", WARM_PROMPTS)
    warm = submit(first.daemon, warm_data, tmp_path / "warm-out.parquet", *sampling, "--endpoints", quick)
    assert wait_ended(first.daemon, warm, timeout=300)["state"] == "JOB_STATE_SUCCEEDED"
    before = generated(second)
    out = tmp_path / "out.parquet"
    # Unseeded, no stop strings, 128 tokens or more: streamed, and movable in the tail. The engine's
    # first request (two samples: it runs two sequences) takes far longer than the simulator's six, so
    # the tail finds it running (its first rate is read across the machine's stalls: gauges.py).
    job_id = submit(first.daemon, data, out, *sampling)
    ended = wait_ended(first.daemon, job_id, timeout=300)
    assert ended["state"] == "JOB_STATE_SUCCEEDED", ended
    table = pq.read_table(out)
    assert_each_pair_once(table, PROMPTS, K)
    found = job(first.daemon, job_id)
    # Requests ran on the engine (it is reachable only through host 2's per-instance route), streamed, and
    # the tail moved them onto the simulator, each continued from the token ids the engine had streamed.
    if int(found["moved_requests"]) == 0:  # in full on a failure (pytest shows what was printed): CI runs it
        print(json.dumps(found["endpoints"], indent=1), *first.daemon.stderr.splitlines()[-60:], sep="\n")
    assert int(found["moved_requests"]) > 0
    # The engine's own counter moved during the job: the moved requests streamed from it (a CI run moved
    # them after its first chunk, at 63 tokens made; a quiet engine gets no probe before the hang timeout).
    assert generated(second) > before
    assert all(n == TOKENS for n in table.column("completion_tokens").to_pylist())  # moved ones too: whole
