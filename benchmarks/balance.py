"""Balance: the dispatcher's policies over heterogeneous simulated servers (a first look).

    .venv/bin/python benchmarks/balance.py [--prompts 2000] [--samples 8] [--time-scale 0.2]

Four mvllm-sim processes with --speed 1, 1, 0.5 and 0.25 (the default long-tailed output lengths),
one job per policy through the job runner, in this process. Makespan is wall time divided by the
time scale. The capacity lower bound is the useful work (the tokens generated) over the servers'
summed full-batch throughput (measured on the simulated clock by a single full batch), or the longest
single sequence's decode time, whichever is larger. Prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mvllm_sim.engine import Engine, SimRequest
from mvllm_sim.profiles import step_model
from mvllmd.jobs.dispatch import DispatchSettings, Endpoint, Policy
from mvllmd.jobs.requests import Sampling
from mvllmd.jobs.runner import JobSpec, prepare, run_job

from benchkit import sim_servers

SPEEDS = (1.0, 1.0, 0.5, 0.25)
MAX_TOKENS = 2048


def full_batch_tokens_per_s(speed: float) -> float:
    """One server's decode throughput with a full batch of average-length sequences, simulated clock."""
    model = step_model("h100-8b", speed=speed)
    engine = Engine(model, model.max_num_seqs, model.max_num_batched_tokens, model.kv_tokens)
    for i in range(model.max_num_seqs):
        engine.add(SimRequest(prompt_ids=[i * 100_003 + j for j in range(32)], targets=[250]))
    while engine.step() is not None:
        pass
    return engine.counters.generation_tokens / engine.now


async def one_run(policy: Policy, urls: list[str], data: Path, out: Path, samples: int) -> tuple[float, int, int]:
    spec = JobSpec(
        input_path=data,
        output_path=out,
        sampling=Sampling(model="sim", max_tokens=MAX_TOKENS),
        num_samples=samples,
        overwrite=True,
        dispatch=DispatchSettings(policy=policy, max_concurrent=4096),
    )
    endpoints = [Endpoint(url, capacity=1024) for url in urls]
    started = time.monotonic()
    progress = await run_job(prepare(spec), endpoints, asyncio.Event())
    longest = max(pq.read_table(out, columns=["completion_tokens"]).column(0).to_pylist())
    return time.monotonic() - started, progress.tokens, longest


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=2000)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--time-scale", default="0.2")
    args = p.parse_args()
    scale = float(args.time_scale)
    capacity = sum(full_batch_tokens_per_s(s) for s in SPEEDS)
    per_token_s = step_model("h100-8b").step_time(1, 300, 1)  # one sequence alone, fastest server
    rows = []
    with tempfile.TemporaryDirectory(prefix="mv-balance-") as tmp:
        data = Path(tmp) / "prompts.parquet"
        pq.write_table(
            pa.table({"prompt": [f"Question number {i}: say something." for i in range(args.prompts)]}), data
        )
        for policy in ("round-robin", "least-loaded"):
            with sim_servers([["--speed", str(speed), "--time-scale", args.time_scale] for speed in SPEEDS]) as urls:
                wall, tokens, longest = await one_run(policy, urls, data, Path(tmp) / "out.parquet", args.samples)  # type: ignore[arg-type]
            bound = max(tokens / capacity, longest * per_token_s)
            rows.append((policy, wall / scale, bound))
    print(f"balance, speeds {SPEEDS}, {args.prompts} prompts x {args.samples} samples, --time-scale {scale}, "
          f"{time.strftime('%Y-%m-%d')}, {platform.node()} ({os.cpu_count()} cores)\n")  # fmt: skip
    print("| policy | makespan (simulated s) | capacity lower bound (s) | makespan / bound |")
    print("|---|---|---|---|")
    for policy, makespan, bound in rows:
        print(f"| {policy} | {makespan:.1f} | {bound:.1f} | {makespan / bound:.2f} |")
    print(f"\nleast-loaded / round-robin: {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
