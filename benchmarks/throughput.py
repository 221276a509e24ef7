"""Throughput of the job path end to end: parquet in, requests, parts, one sorted parquet out.

    .venv/bin/python benchmarks/throughput.py [--prompts 50000] [--servers 2]

Servers are mvllm-sim processes that answer at once (--time-scale 0); one sample per prompt; the job
runs in this process through the job runner (reader, dispatcher, part writer, assembly). Prints a
table with completed samples per second of wall time, assembly included.
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

from mvllmd.jobs.dispatch import DispatchSettings, Endpoint
from mvllmd.jobs.requests import Sampling
from mvllmd.jobs.runner import JobSpec, prepare, run_job

from benchkit import sim_servers


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=50_000)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--max-concurrent", type=int, default=256)
    args = p.parse_args()
    with sim_servers([["--time-scale", "0"]] * args.servers) as urls, tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.parquet"
        pq.write_table(pa.table({"prompt": [f"Say something about {i}." for i in range(args.prompts)]}), data)
        spec = JobSpec(
            input_path=data,
            output_path=Path(tmp) / "out.parquet",
            sampling=Sampling(model="sim", max_tokens=8),
            dispatch=DispatchSettings(max_concurrent=args.max_concurrent),
        )
        started = time.monotonic()
        progress = await run_job(prepare(spec), [Endpoint(u, capacity=1024) for u in urls], asyncio.Event())
        wall = time.monotonic() - started
        rows = pq.read_metadata(spec.output_path).num_rows
    print(f"job throughput, {args.prompts:,} prompts x 1 sample, {args.servers} mvllm-sim at --time-scale 0, "
          f"{time.strftime('%Y-%m-%d')}, {platform.node()} ({os.cpu_count()} cores)\n")  # fmt: skip
    print("| samples | rows written | errors | wall (s) | samples/s |")
    print("|---|---|---|---|---|")
    rate = progress.samples_done / wall
    print(f"| {progress.samples_done:,} | {rows:,} | {progress.errors} | {wall:.1f} | {rate:,.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
