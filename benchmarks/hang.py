"""How long a hung server keeps its requests: from the hang to the server being out, for a job and for
the front door, with the real vLLM CPU build and with mvllm-sim.

    .venv/bin/python benchmarks/hang.py [--engines sim,vllm]

For each engine, one mvllmd (built-in supervisor, front door on a free port) launches two instances,
with the daemon's own instance health check set to 10 minutes, so that what is measured is the
endpoint table's watch that jobs and the front door share (dispatch/endpoint.py). The hang is the one
users meet: the engine stops while its API server still answers `/health` 200 and `/metrics`:

- vLLM: SIGSTOP of the engine's worker process (`VLLM::Worker`); its /metrics keeps answering, its
  running and waiting gauges frozen as they were (38 running, in one run here) and its token counters
  still;
- mvllm-sim: SIGUSR1 (its engine stops stepping; its gauges freeze as they were, as vLLM's do).

Twice per engine:
- a job: a rollout job keeps both instances busy; once each holds requests of the job, one is hung;
  the time until the job's own view of that server says `out` (GetJob) is the time to be out;
- the front door: 16 clients send completions through the front door; once the other instance holds
  some, it is hung; the time until the front door's /metrics counts it hung
  (`mvllm_server_hangs_total`).

Before (main at e1f1a57) the same hang was found by the answer timeout alone: `hang_timeout_s` (120 s)
with nothing answered; an instance left sooner only once the daemon's health check (30 s by default,
and 30 s more to kill it) marked it UNHEALTHY. Each hang is undone after (SIGCONT; the sim is left
hung): the first run hangs the first instance, the second the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai

from mvllm.v1 import job_pb2

from benchkit import ctl, engine_dir, exit_on_sigterm, machine, mvllmd, print_table, write_prompts

READY_TIMEOUT_S = 600.0
OUT_TIMEOUT_S = 200.0  # the fallback (120 s) plus room: a run that goes past it failed to see the hang
CLIENTS = 16
HANGS, INFLIGHT = "mvllm_server_hangs_total", "mvllm_server_inflight"


def wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll every 50 ms; the time it took. RuntimeError after timeout_s."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not seen in {timeout_s:g}s")


# --- hanging one engine ----------------------------------------------------------------------------


def group(pgid: int) -> set[int]:
    """The PIDs of a process group (a supervised engine leads its own)."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.add(int(stat.parent.name))
    return members


@contextlib.contextmanager
def hung(engine: str, pid: int) -> Iterator[None]:
    """Hang the instance whose main process is `pid` while inside; undo it after where it can be."""
    if engine == "sim":
        os.kill(pid, signal.SIGUSR1)  # for good: the endpoint stays out for the hang timeout anyway
        yield
        return
    workers = [p for p in group(pid) if Path(f"/proc/{p}/comm").read_text().strip() == "VLLM::Worker"]
    if not workers:
        raise RuntimeError(f"no VLLM::Worker process under the engine {pid}")
    for worker in workers:
        os.kill(worker, signal.SIGSTOP)
    try:
        yield
    finally:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGCONT)


# --- the two users ---------------------------------------------------------------------------------


def job_run(daemon: Any, model: str, victim: dict[str, Any], engine: str, tmp: Path) -> float:
    """Seconds from the hang to the job's view of the victim saying `out`."""
    prompts = tmp / f"prompts-{victim['name']}.parquet"
    write_prompts(prompts, 5000)
    sampling = job_pb2.SamplingParams(max_tokens=256, temperature=1.0)
    out = tmp / f"out-{victim['name']}.parquet"
    spec = job_pb2.JobSpec(input_path=str(prompts), output_path=str(out), num_samples=1, model=model, sampling=sampling)
    job = daemon.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec)).job

    def lane() -> Any:
        found = daemon.jobs.GetJob(job_pb2.GetJobRequest(id=job.id)).job
        return next((e for e in found.endpoints if e.url == victim["url"]), None)

    try:
        wait(lambda: (found := lane()) is not None and found.inflight > 0, 120, "the job's requests on the victim")
        with hung(engine, victim["pid"]):
            took = wait(lambda: lane().out, OUT_TIMEOUT_S, f"{victim['name']} out of the job")
    finally:
        daemon.jobs.CancelJob(job_pb2.CancelJobRequest(id=job.id))
    return took


def door_metric(door: str, name: str, url: str) -> float:
    """The front door's metric `name` for the server `url` (0 when it has none)."""
    for line in httpx.get(f"{door}/metrics", timeout=10).text.splitlines():
        if line.startswith(f'{name}{{server="{url}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def door_run(door: str, model: str, victim: dict[str, Any], engine: str) -> float:
    """Seconds from the hang to the front door counting the victim hung; CLIENTS clients send meanwhile."""
    stop = threading.Event()
    loop_thread = threading.Thread(target=lambda: asyncio.run(clients(door, model, stop)), daemon=True)
    loop_thread.start()
    before = door_metric(door, HANGS, victim["url"])
    try:
        wait(lambda: door_metric(door, INFLIGHT, victim["url"]) > 0, 120, "front-door requests on the victim")
        with hung(engine, victim["pid"]):
            took = wait(lambda: door_metric(door, HANGS, victim["url"]) > before, OUT_TIMEOUT_S,
                        f"{victim['name']} counted hung by the front door")  # fmt: skip
    finally:
        stop.set()
        loop_thread.join(60)
    return took


async def clients(door: str, model: str, stop: threading.Event) -> None:
    async with openai.AsyncOpenAI(base_url=f"{door}/v1", api_key="unused", max_retries=0, timeout=300) as client:

        async def one(i: int) -> None:
            while not stop.is_set():
                with contextlib.suppress(openai.OpenAIError):
                    await client.completions.create(model=model, prompt=f"client {i} says", max_tokens=256)

        tasks = [asyncio.create_task(one(i)) for i in range(CLIENTS)]
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- one engine ------------------------------------------------------------------------------------


def measure(engine: str, tmp: Path) -> tuple[float, float]:
    """(job, front door) seconds to out, with two instances of `engine`."""
    flags = ["--http-listen", "http://127.0.0.1:0", "--hang-timeout", "600"]
    if engine == "vllm":
        path = engine_dir()
        model = str(path / "tiny-qwen2")
        config = tmp / "mvllmd.toml"
        config.write_text(f'[inventory]\ncpu_slots = 2\n[engine.vllm]\npython = "{path}/venv/bin/python"\n')
        flags += ["--config", str(config)]
        launch = ["launch", model, "-n", "2", "--cpu", "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--name", "hang"]
        sim_gpus = 0
    else:
        model = "sim"
        launch = ["launch", model, "-n", "2", "--engine", "sim", "--name", "hang", "--", "--time-scale", "1"]
        sim_gpus = 2
    with mvllmd(sim_gpus, *flags) as daemon:
        sock = f"{daemon.tmp}/m.sock"
        print(f"{engine}: launching two instances", file=sys.stderr, flush=True)
        ctl(sock, *launch, "--wait-timeout", str(READY_TIMEOUT_S), timeout=READY_TIMEOUT_S + 60)
        (door,) = json.loads(ctl(sock, "info", "--json"))["http_urls"]
        first, second = json.loads(ctl(sock, "status", "--json"))["instances"]
        print(f"{engine}: a job, {first['name']} hung", file=sys.stderr, flush=True)
        job_s = job_run(daemon, model, first, engine, tmp)
        print(f"{engine}: the front door, {second['name']} hung", file=sys.stderr, flush=True)
        door_s = door_run(door, model, second, engine)
    return job_s, door_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="sim,vllm", help="sim, vllm or both [sim,vllm]")
    args = p.parse_args()
    exit_on_sigterm()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    rows = []
    for engine in engines:
        with tempfile.TemporaryDirectory(prefix="mv-hang-", dir="/tmp") as tmp:
            job_s, door_s = measure(engine, Path(tmp))
        how = "SIGSTOP of VLLM::Worker" if engine == "vllm" else "SIGUSR1 (engine stops)"
        rows.append((engine, how, f"{job_s:.1f}", f"{door_s:.1f}", "120 (the answer timeout)"))
    print(f"{machine()}, {time.strftime('%Y-%m-%d')}. Seconds from the hang to the server out (goal: 15 s or less).\n")
    print_table(("engine", "hang", "job: out after (s)", "front door: out after (s)", "before (s)"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
