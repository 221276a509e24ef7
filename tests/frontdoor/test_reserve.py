"""Jobs and the front door share servers: an agent's request is not queued behind a big job.

While the front door uses a server, jobs leave `[http] reserve` of its batch free (endpoint.py). The
proof is the simulator's own `vllm:request_queue_time_seconds`, on its simulated clock: the agent's
requests, sent while a 100,000-sample job keeps the server busy, waited not at all for the batch.
Without the reserve (0) the job fills the batch and the same requests do wait: the test can fail.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from daemonkit import Spawn, wait_for
from jobkit import daemon_args, instance, job, launch, submit, write_prompts

BATCH = 32  # the server's max_num_seqs
SAMPLES = 100_000  # a prompt each: the job fills each place in the batch the moment it frees
AGENT_TURNS = 20
THINK_S = 0.05  # between an agent's turns


def gauge(client: httpx.Client, server: str, name: str) -> float:
    text = client.get(f"{server}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.parametrize(("reserve", "agent_waits"), [("0.1", False), ("0", True)])
def test_an_agents_request_is_not_queued_behind_a_big_job(
    short_tmp: Path, spawn: Spawn, reserve: str, agent_waits: bool
) -> None:
    daemon = spawn(daemon_args(short_tmp, "--http-reserve", reserve))
    (door,) = json.loads(daemon.ctl("info", "--json").stdout)["http_urls"]
    # Samples of varied lengths (the simulator's, median 200 tokens): they end one by one, and the job
    # fills each place as it frees.
    (name,) = launch(daemon, 1, "--time-scale", "0.2", "--max-num-seqs", str(BATCH))
    server = instance(daemon, name)["url"]
    body = {"model": "m", "prompt": "an agent's turn", "max_tokens": 4}
    with httpx.Client(timeout=60) as client:
        assert client.post(f"{door}/v1/completions", json=body).status_code == 200  # the agent is there

        data = write_prompts(short_tmp / "in.parquet", SAMPLES)
        job_id = submit(daemon, data, short_tmp / "out.parquet", "-k", "1", "--max-tokens", "1000")
        jobs_hold = BATCH if reserve == "0" else BATCH - 4  # 10 % of 32, rounded up, is left free
        wait_for(lambda: job(daemon, job_id)["inflight"] >= jobs_hold, timeout=60)

        waited_before = gauge(client, server, "vllm:request_queue_time_seconds_sum")
        for _ in range(AGENT_TURNS):
            assert client.post(f"{door}/v1/completions", json=body).status_code == 200
            # An agent thinks between turns. Without it the control could fail: the job counts the door's
            # request in the server's load and leaves its place free until its next refill, and a turn
            # sent at once found that place still free (1 run in 3 with mvllmd on uvloop).
            time.sleep(THINK_S)
        waited = gauge(client, server, "vllm:request_queue_time_seconds_sum") - waited_before

    found = job(daemon, job_id)
    assert found["state"] == "JOB_STATE_RUNNING" and found["samples_done"] < SAMPLES // 10
    assert found["inflight"] <= jobs_hold  # never more than its part of the batch
    assert daemon.ctl("cancel", job_id).returncode == 0
    if agent_waits:
        assert waited > 0  # the job held the whole batch: each agent request waited for a place
    else:
        # The reserve: each started in the step after it arrived, beside the job's samples. The sum is the
        # server's, so it also counts the job's samples that ended meanwhile: none of them waited either.
        assert waited == 0, waited
