"""Throughput of the job path end to end: parquet in, requests, parts, one sorted parquet out.

    .venv/bin/python benchmarks/throughput.py [--prompts 50000] [--seed-prompts 10000] [--servers 1]

One mvllmd (built-in supervisor) launches --servers mvllm-sim instances that answer at once
(--time-scale 0). Against those same servers, one sample per prompt, --max-concurrent samples in
flight, three ways:

- mvllmd:      a job submitted to the daemon over gRPC; timed from SubmitJob until GetJob (polled every
               20 ms) says SUCCEEDED, which is after the output parquet is assembled;
- in-process:  the same job run by the job runner in this process (reader, dispatcher, part writer,
               assembly);
- seed:        the seed document's way: one AsyncOpenAI client per base URL, round robin over them, an
               asyncio.Semaphore(max_concurrent), results gathered and written with pandas to parquet
               (completions, like the job, not chat);
- bare loop:   not a way to run a job: one aiohttp session, a semaphore, round robin, the job's
               request bodies, answers parsed and dropped; no job logic, nothing written. What aiohttp
               alone costs (the job runner sends its requests with its own lean client, transport/http.py, and
               puts the short requests of a turn to one server together: transport/batches.py).

The daemon, the simulators and this process share the machine's cores: one simulator by default, so
that on 2 cores the simulator and the client (the daemon's one event loop) each have about one; two
simulators did less here, not more. Prints a table with completed
samples per second of wall time, and the CPU seconds the client side (the daemon, or this process)
and the simulators used.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pandas as pd
import pyarrow.parquet as pq
from openai import AsyncOpenAI

from mvllm.jobs import JobSpec, Sampling
from mvllm.v1 import job_pb2
from mvllmd.transport.requests import build_body

from benchkit import (
    Daemon,
    cpu_seconds,
    exit_on_sigterm,
    load_average,
    machine,
    mvllmd,
    print_table,
    run_in_process,
    write_prompts,
)

MODEL = "sim"
MAX_TOKENS = 8


def via_daemon(daemon: Daemon, data: Path, out: Path, max_concurrent: int) -> int:
    spec = job_pb2.JobSpec(
        input_path=str(data),
        output_path=str(out),
        num_samples=1,
        model=MODEL,
        sampling=job_pb2.SamplingParams(max_tokens=MAX_TOKENS),
        max_concurrent=max_concurrent,
        overwrite=True,
    )
    job, _ = daemon.run_job(spec)
    return job.samples_done


def in_process(urls: list[str], capacity: int, data: Path, out: Path, max_concurrent: int) -> int:
    spec = JobSpec(
        input_path=data,
        output_path=out,
        model=MODEL,
        sampling=Sampling(max_tokens=MAX_TOKENS),
        max_concurrent=max_concurrent,
        overwrite=True,
    )
    progress = asyncio.run(run_in_process(spec, urls, capacity))
    return progress.samples_done


def seed(urls: list[str], data: Path, out: Path, max_concurrent: int) -> int:
    """generate_rollouts.py's vLLM path: AsyncOpenAI per URL, round robin, a semaphore, pandas."""

    async def rollouts() -> int:
        prompts = pd.read_parquet(data)["prompt"].tolist()
        clients = [AsyncOpenAI(base_url=f"{u}/v1", api_key="EMPTY") for u in urls]
        semaphore = asyncio.Semaphore(max_concurrent)
        turn = itertools.count()

        async def generate(index: int, prompt: str) -> dict[str, Any]:
            client = clients[next(turn) % len(clients)]  # request i -> instance i mod N
            async with semaphore:
                response = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS)
            choice = response.choices[0]
            return {"prompt_index": index, "sample_index": 0, "prompt": prompt, "response": choice.text,
                    "finish_reason": choice.finish_reason}  # fmt: skip

        results = await asyncio.gather(*(generate(i, p) for i, p in enumerate(prompts)))
        pd.DataFrame(results).to_parquet(out)
        for client in clients:
            await client.close()
        return len(results)

    return asyncio.run(rollouts())


def bare_loop(urls: list[str], data: Path, max_concurrent: int) -> int:
    """What one aiohttp session alone does: the job's bodies, round robin, answers parsed, nothing kept."""

    async def loop() -> int:
        prompts = pq.read_table(data).column("prompt").to_pylist()
        sampling = Sampling(max_tokens=MAX_TOKENS)
        semaphore = asyncio.Semaphore(max_concurrent)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(index: int, prompt: str) -> None:
                async with semaphore:
                    url = f"{urls[index % len(urls)]}/v1/completions"
                    async with session.post(url, json=build_body(MODEL, sampling, prompt, 1, None)) as response:
                        await response.json()

            await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return len(prompts)

    return asyncio.run(loop())


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(run: Callable[[], int], client_cpu: Callable[[], float], sim_pids: list[int], out: Path | None
            ) -> list[float]:  # fmt: skip
    """Samples, seconds, client CPU s, simulators' CPU s, for one run; checks the output's rows."""
    client0, sims0 = client_cpu(), sum(cpu_seconds(p) for p in sim_pids)
    started = time.monotonic()
    samples = run()
    wall = time.monotonic() - started
    rows = pq.read_metadata(out).num_rows if out is not None else samples
    if rows != samples:
        raise RuntimeError(f"{out} holds {rows} rows where {samples} samples were done")
    return [samples, wall, client_cpu() - client0, sum(cpu_seconds(p) for p in sim_pids) - sims0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=50_000, help="for mvllmd and in-process [50000]")
    p.add_argument("--seed-prompts", type=int, default=10_000, help="for the seed's way, slower [10000]")
    p.add_argument("--servers", type=int, default=1, help="mvllm-sim instances [1]")
    p.add_argument("--max-concurrent", type=int, default=256, help="samples in flight, every approach [256]")
    p.add_argument("--repeats", type=int, default=1, help="runs of each approach; the median is shown [1]")
    args = p.parse_args()
    exit_on_sigterm()
    header = (f"job throughput, 1 sample per prompt, max_tokens {MAX_TOKENS}, {args.servers} mvllm-sim instances "
              f"at --time-scale 0 launched by mvllmd, {args.max_concurrent} samples in flight; the simulators, "
              f"mvllmd and the client share the cores; median of {args.repeats}; {time.strftime('%Y-%m-%d')}; "
              f"{machine()}; {load_average()} at the start\n")  # fmt: skip
    results: dict[str, list[list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mv-bench-", dir="/tmp") as tmp, mvllmd(args.servers) as daemon:
        instances = daemon.launch(MODEL, args.servers, engine_args=["--time-scale", "0"])
        urls, pids = [i.url.removesuffix("/v1") for i in instances], [i.pid for i in instances]
        capacity = instances[0].max_num_seqs or 256
        data, seed_data, out = Path(tmp, "prompts.parquet"), Path(tmp, "seed.parquet"), Path(tmp, "out.parquet")
        write_prompts(data, args.prompts)
        write_prompts(seed_data, args.seed_prompts)
        approaches: list[tuple[str, Callable[[], int], Callable[[], float], Path | None]] = [
            ("mvllmd (gRPC submit to SUCCEEDED)", lambda: via_daemon(daemon, data, out, args.max_concurrent),
             lambda: cpu_seconds(daemon.pid), out),
            ("in-process job runner", lambda: in_process(urls, capacity, data, out, args.max_concurrent),
             self_cpu_s, out),
            ("seed: AsyncOpenAI + semaphore + round robin + pandas",
             lambda: seed(urls, seed_data, out, args.max_concurrent), self_cpu_s, out),
            ("for comparison: bare aiohttp loop, no job logic, nothing written",
             lambda: bare_loop(urls, data, args.max_concurrent), self_cpu_s, None),
        ]  # fmt: skip
        for _ in range(args.repeats):
            for name, run, client_cpu, written in approaches:
                print(f"{name} ...", file=sys.stderr, flush=True)
                results.setdefault(name, []).append(measure(run, client_cpu, pids, written))
    print(header)
    rows = []
    for name, runs in results.items():
        samples, wall, client, sims = (statistics.median(column) for column in zip(*runs, strict=True))
        rows.append([name, f"{samples:,.0f}", f"{wall:.1f}", f"{samples / wall:,.0f}", f"{client:.1f}", f"{sims:.1f}"])
    print_table(["approach", "samples", "seconds", "samples/s", "client CPU s", "simulators' CPU s"], rows)


if __name__ == "__main__":
    main()
