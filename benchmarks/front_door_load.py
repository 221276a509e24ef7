"""The front-door benchmark's load generator, run as a process of its own (not in the benchmark's loop).

    .venv/bin/python benchmarks/front_door_load.py --url URL [--url URL ...] [--concurrency 64]
        [--rate 0] [--warmup 1] [--duration 5] [--max-tokens 8]

Sends non-streamed `/v1/completions` requests (model "sim", a short prompt, `max_tokens` tokens) over
keep-alive connections with mvllmd's own lean HTTP/1.1 client (transport/http.py, on httptools; on
asyncio's own loop, which that client is written for), the same for every target. With several URLs
it splits the load over them round robin (a connection, or an open-loop request, to each in turn):
that is "straight to the servers".

- closed loop (`--rate 0`): `--concurrency` workers, each sending its next request when the last is
  answered: the most the target serves at that concurrency;
- open loop (`--rate R`): a request every 1/R s on a fixed schedule, whatever the answers do (a new
  connection only when every open one is busy), so that latency is read at a load the target keeps up
  with. A request is timed from the moment it is due, so a target that falls behind pays for it.

Requests that begin in the `--warmup` seconds are sent but not counted (connections open, caches
warm). Prints one JSON object: requests counted and their seconds, requests sent in all (warm-up
included), requests/s, latency p50/p90/p99 in ms, errors (an answer other than 200, or a failed
connection), how late the open loop fell behind its schedule at worst, and this process's CPU
microseconds per request sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

from mvllmd.transport import http

HEADERS = {"Content-Type": "application/json"}


@dataclass
class Tally:
    """What the measured window saw: latencies in seconds, errors, the worst schedule lag."""

    start: float
    stop: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    late_s: float = 0.0
    sent: int = 0  # all requests, the warm-up's too

    def record(self, began: float, ok: bool, what: str = "") -> None:
        self.sent += 1
        if not self.start <= began < self.stop:
            return
        if ok:
            self.latencies.append(time.perf_counter() - began)
            return
        self.errors += 1
        self.first_error = self.first_error or what


def body(max_tokens: int) -> bytes:
    return json.dumps({"model": "sim", "prompt": "Say something short.", "max_tokens": max_tokens}).encode()


async def one(pool: http.Pool, payload: bytes, tally: Tally, began: float) -> None:
    try:
        response = await pool.post("/v1/completions", payload, HEADERS)
    except (http.HttpError, OSError) as exc:
        tally.record(began, False, f"{type(exc).__name__}: {exc}")
        return
    tally.record(began, response.status == 200, f"HTTP {response.status}: {response.body[:200]!r}")


async def closed_loop(pools: list[http.Pool], payload: bytes, concurrency: int, tally: Tally) -> None:
    async def worker(pool: http.Pool) -> None:
        while (began := time.perf_counter()) < tally.stop:
            await one(pool, payload, tally, began)

    await asyncio.gather(*(worker(pools[i % len(pools)]) for i in range(concurrency)))


async def open_loop(pools: list[http.Pool], payload: bytes, rate: float, tally: Tally, t0: float) -> None:
    tasks: set[asyncio.Task[None]] = set()
    sent = 0
    while (due := t0 + sent / rate) < tally.stop:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
            continue
        if due >= tally.start:
            tally.late_s = max(tally.late_s, now - due)
        task = asyncio.create_task(one(pools[sent % len(pools)], payload, tally, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    await asyncio.gather(*tasks)


async def run(args: argparse.Namespace) -> dict[str, object]:
    client = http.Client()
    pools = [client.pool(url) for url in args.url]
    payload = body(args.max_tokens)
    t0 = time.perf_counter()
    tally = Tally(t0 + args.warmup, t0 + args.warmup + args.duration)
    cpu = time.process_time()
    try:
        if args.rate > 0:
            await open_loop(pools, payload, args.rate, tally, t0)
        else:
            await closed_loop(pools, payload, args.concurrency, tally)
    finally:
        client.close()
    cpu = time.process_time() - cpu
    done = sorted(tally.latencies)
    quantiles = statistics.quantiles(done, n=100, method="inclusive") if len(done) > 1 else [0.0] * 99
    return {
        "requests": len(done),
        "sent": tally.sent,
        "errors": tally.errors,
        "first_error": tally.first_error,
        "seconds": args.duration,
        "rps": len(done) / args.duration,
        "p50_ms": quantiles[49] * 1e3,
        "p90_ms": quantiles[89] * 1e3,
        "p99_ms": quantiles[98] * 1e3,
        "late_ms": tally.late_s * 1e3,
        "generator_cpu_us": cpu / max(1, tally.sent) * 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", action="append", required=True, help="a base URL (repeat to split the load)")
    p.add_argument("--concurrency", type=int, default=64, help="closed loop: requests in flight [64]")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second; 0: closed loop [0]")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not counted [1]")
    p.add_argument("--duration", type=float, default=5.0, help="seconds counted [5]")
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
