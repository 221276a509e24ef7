"""How much one mvllm-sim process holds and serves on this machine.

    .venv/bin/python benchmarks/sim_capacity.py [--time-scale 0.001] [--hold 5000] [--requests 30000]

1. hold: --hold requests with long outputs are sent at once; /metrics is read while they are in
   flight: running + waiting sequences, as the simulator reports them.
2. throughput: --requests short completions (8 tokens) at --concurrency, from one aiohttp client
   process; requests per second of wall time, and the simulator's own count of finished requests.

Prints a table. A benchmark, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time

import aiohttp

from benchkit import sim_servers


async def metrics(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "_bucket" not in line:
            name = line.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


async def hold(http: aiohttp.ClientSession, base: str, count: int) -> tuple[float, float]:
    # Outputs long enough that none finishes while the rest are still being sent.
    body = {"model": "sim", "prompt": "hold this thought", "max_tokens": 100_000, "ignore_eos": True}

    async def one() -> None:
        async with http.post(f"{base}/v1/completions", json=body) as r:
            await r.read()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    peak, peak_running = 0.0, 0.0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        m = await metrics(http, base)
        held = m["vllm:num_requests_running"] + m["vllm:num_requests_waiting"]
        if held > peak:
            peak, peak_running = held, m["vllm:num_requests_running"]
        if peak >= count:
            break
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return peak, peak_running


async def throughput(http: aiohttp.ClientSession, base: str, total: int, concurrency: int) -> tuple[float, int]:
    body = {"model": "sim", "prompt": "Say something short.", "max_tokens": 8}
    queue = iter(range(total))
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for _ in queue:
            async with http.post(f"{base}/v1/completions", json=body) as r:
                await r.read()
                failures += r.status != 200

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.monotonic() - start), failures


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time-scale", default="0.001")
    p.add_argument("--hold", type=int, default=5000)
    p.add_argument("--requests", type=int, default=30000)
    p.add_argument("--concurrency", type=int, default=256)
    args = p.parse_args()
    with sim_servers([["--time-scale", args.time_scale]]) as (base,):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
            peak, running = await hold(http, base, args.hold)
            before = await metrics(http, base)
            rate, failures = await throughput(http, base, args.requests, args.concurrency)
            after = await metrics(http, base)
    finished = after["vllm:request_success_total"] - before["vllm:request_success_total"]
    print(f"mvllm-sim capacity, {time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, --time-scale {args.time_scale}")  # fmt: skip
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| sequences held at once (running + waiting), {args.hold} sent | {peak:,.0f} ({running:,.0f} running) |")
    print(f"| requests/s, {args.requests:,} x 8-token completions, concurrency {args.concurrency} | {rate:,.0f} |")
    print(f"| failed requests | {failures} |")
    print(f"| requests the simulator counted as finished | {finished:,.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
