"""Balance: the dispatcher's policies over heterogeneous and homogeneous simulated servers.

    .venv/bin/python benchmarks/balance.py [--prompts 2000] [--samples 8] [--time-scale 0.5] [--case both]
                                      [--homogeneous-runs 3] [--timeline FILE.json]

Four mvllm-sim processes, with --speed 1, 1, 0.5 and 0.25 (case "heterogeneous") or all at 1 (case
"homogeneous"), the default long-tailed output lengths, max_tokens 2,048, no seed (so least-loaded
streams its requests and moves samples in the tail); one job per policy and case through the job
runner, in this process. Makespan is wall time divided by the time scale; the dispatcher reads the
servers' /metrics every simulated second (its interval is scaled as the servers' clocks are).
The capacity lower bound is the useful work over the servers' summed full-batch capacity, or the
longest single sequence's decode time at batch 1, whichever is larger. The work is the job's own (each
sample's prompt and completion tokens, read back from the output) priced by the simulator's step
model at full batch: see work_bound_s. The table also shows the looser bound from the throughput of
one batch of 250-token sequences, which prices a long-tailed job's long contexts as short ones.
Equal servers are run --homogeneous-runs times for each policy, alternating, since their makespans
are close. Prints a table of both cases and the ratios.

With --timeline FILE, a thread reads each server's vllm:num_requests_running from its /metrics every
--timeline-interval wall seconds during each run and FILE gets the points as JSON (run_all.py draws them,
one line per server):

    {"prompts": 2000, "samples": 8, "time_scale": 0.5, "interval_s": 0.1,
     "runs": [{"case": "heterogeneous", "speeds": [1.0, ...], "policy": "round-robin", "run": 1,
               "makespan_s": 269.3, "reader_cpu_s": 0.8,
               "servers": {"server 1 (speed 1)": [[t, running], ...], ...}}, ...]}

t is in simulated seconds from the job's start (wall / time scale), as the makespan is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from mvllm.jobs import JobSpec, Policy, Sampling
from mvllm_sim.engine import Engine, SimRequest
from mvllm_sim.profiles import step_model

from benchkit import run_in_process, sim_servers

CASES = {"heterogeneous": (1.0, 1.0, 0.5, 0.25), "homogeneous": (1.0, 1.0, 1.0, 1.0)}
POLICIES: tuple[Policy, ...] = (Policy.ROUND_ROBIN, Policy.LEAST_LOADED)
MAX_TOKENS = 2048
RUNNING = re.compile(r"^vllm:num_requests_running(?:\{[^}]*\})? (\S+)$", re.MULTILINE)


def full_batch_tokens_per_s(speed: float) -> float:
    """One server's decode throughput with one full batch of 250-token sequences, simulated clock.

    The brief's first reading of "full-batch capacity"; it leaves out what a long-tailed workload's
    longer contexts cost, so its bound is loose (kept in the table for comparison)."""
    model = step_model("h100-8b", speed=speed)
    engine = Engine(model, model.max_num_seqs, model.max_num_batched_tokens, model.kv_tokens)
    for i in range(model.max_num_seqs):
        engine.add(SimRequest(prompt_ids=[i * 100_003 + j for j in range(32)], targets=[250]))
    while engine.step() is not None:
        pass
    return engine.counters.generation_tokens / engine.now


def work_bound_s(prompt_tokens: list[int], completion_tokens: list[int], speeds: tuple[float, ...]) -> float:
    """The job's own work at full batch, over the servers' summed speed: a lower bound for any schedule.

    A step costs overhead + max(weight read, per-token compute) + per-context-token reads + per-sequence
    work (profiles.toml). Summed over a job's steps, whatever the schedule, that is at least
    per-token and per-sequence cost for every generated token, the context read for every generated
    token (a sample of L tokens after a prompt of P reads at least P*L + L*(L-1)/2 context tokens), and one
    overhead per full batch of max_num_seqs tokens. Prefill and the weight-read floor are left out,
    which keeps it a lower bound. Work splits across servers, each at its speed, so the makespan is at
    least the total over the summed speeds."""
    model = step_model("h100-8b")
    tokens = sum(completion_tokens)
    context = sum(p * n + n * (n - 1) // 2 for p, n in zip(prompt_tokens, completion_tokens, strict=True))
    per_token = model.per_token_s + model.per_seq_s + model.overhead_s / model.max_num_seqs
    return (tokens * per_token + context * model.per_ctx_token_s) / sum(speeds)


class RunningSampler:
    """Each server's vllm:num_requests_running, read from its /metrics every INTERVAL_S wall seconds in a
    thread of its own, as (wall seconds since the start, sequences running) per URL."""

    def __init__(self, urls: Sequence[str], interval_s: float) -> None:
        self.urls, self.interval_s = list(urls), interval_s
        self.points: dict[str, list[tuple[float, int]]] = {url: [] for url in self.urls}
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="running-sampler", daemon=True)
        self._started = 0.0

    def __enter__(self) -> RunningSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            while True:
                for url in self.urls:
                    self._read(client, url)
                if self._stop.wait(self.interval_s):
                    break
        self.cpu_s = time.thread_time()

    def _read(self, client: httpx.Client, url: str) -> None:
        try:
            text = client.get(f"{url}/metrics").text
        except httpx.HTTPError:
            return  # a missed sample: the line goes straight to the next one
        found = RUNNING.search(text)
        if found:
            self.points[url].append((time.monotonic() - self._started, int(float(found.group(1)))))


def timeline_entry(  # noqa: PLR0917
    case: str, policy: str, run: int, makespan: float, sampler: RunningSampler, scale: float
) -> dict[str, Any]:
    """One run's points for the --timeline file: servers named by their place and speed, simulated seconds."""
    speeds = CASES[case]
    servers = {f"server {i} (speed {speed:g})": [[round(t / scale, 2), n] for t, n in sampler.points[url]]
               for i, (url, speed) in enumerate(zip(sampler.urls, speeds, strict=True), start=1)}  # fmt: skip
    return {"case": case, "speeds": list(speeds), "policy": str(policy), "run": run,
            "makespan_s": round(makespan, 2), "reader_cpu_s": round(sampler.cpu_s, 3), "servers": servers}  # fmt: skip


async def one_run(  # noqa: PLR0917
    policy: Policy, urls: list[str], data: Path, out: Path, samples: int, scale: float
) -> tuple[float, list[int], list[int]]:
    spec = JobSpec(
        input_path=data,
        output_path=out,
        num_samples=samples,
        model="sim",
        sampling=Sampling(max_tokens=MAX_TOKENS),
        policy=policy,
        max_concurrent=4096,
        overwrite=True,
    )
    started = time.monotonic()
    await run_in_process(spec, urls, capacity=1024, metrics_interval_s=scale)
    wall = time.monotonic() - started
    table = pq.read_table(out, columns=["prompt_tokens", "completion_tokens"])
    return wall, table.column(0).to_pylist(), table.column(1).to_pylist()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=2000)
    p.add_argument("--samples", type=int, default=8)
    # 0.5: at 0.2 the four simulators and the dispatcher (which reads every request's stream) at times
    # want more than this machine's two cores, and the servers' clocks fall behind wall time.
    p.add_argument("--time-scale", default="0.5")
    p.add_argument("--case", choices=[*CASES, "both"], default="both")
    p.add_argument("--policy", choices=[*POLICIES, "both"], default="both")
    p.add_argument("--homogeneous-runs", type=int, default=3,
                   help="Runs of each policy on equal servers, alternating (makespans are close). [3]")  # fmt: skip
    p.add_argument("--timeline", type=Path, metavar="FILE",
                   help="write each server's sequences running over time, for every run, to FILE as JSON")  # fmt: skip
    p.add_argument("--timeline-interval", type=float, default=0.1, metavar="S",
                   help="wall seconds between two reads of the servers' /metrics for --timeline [0.1]")  # fmt: skip
    return p.parse_args()


async def main() -> None:
    args = parse_args()
    scale = float(args.time_scale)
    per_token_s = step_model("h100-8b").step_time(1, 300, 1)  # one sequence alone, fastest server
    cases = list(CASES) if args.case == "both" else [args.case]
    policies = POLICIES if args.policy == "both" else (args.policy,)
    rows: dict[tuple[str, str, int], tuple[float, float, float]] = {}
    timelines: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mv-balance-") as tmp:
        data = Path(tmp) / "prompts.parquet"
        pq.write_table(
            pa.table({"prompt": [f"Question number {i}: say something." for i in range(args.prompts)]}), data
        )
        for case in cases:
            speeds = CASES[case]
            capacity = sum(full_batch_tokens_per_s(s) for s in speeds)
            runs = args.homogeneous_runs if case == "homogeneous" else 1
            for run in range(1, runs + 1):
                for policy in policies:
                    argv = [["--speed", str(speed), "--time-scale", args.time_scale] for speed in speeds]
                    with sim_servers(argv) as urls:
                        out = Path(tmp) / "out.parquet"
                        sampler = RunningSampler(urls, args.timeline_interval) if args.timeline else None
                        with sampler or contextlib.nullcontext():
                            wall, prompt, completion = await one_run(policy, urls, data, out, args.samples, scale)
                    if sampler:
                        timelines.append(timeline_entry(case, policy, run, wall / scale, sampler, scale))
                    longest_s = max(completion) * per_token_s
                    bound = max(work_bound_s(prompt, completion, speeds), longest_s)
                    loose = max(sum(completion) / capacity, longest_s)
                    rows[case, policy, run] = (wall / scale, bound, loose)
    print_table(args, rows, cases)
    if args.timeline:
        write_timelines(args, timelines)


def print_table(args: argparse.Namespace, rows: dict[tuple[str, str, int], tuple[float, float, float]],
                cases: list[str]) -> None:  # fmt: skip
    scale = float(args.time_scale)
    print(f"balance, {args.prompts} prompts x {args.samples} samples, --time-scale {scale}, "
          f"{time.strftime('%Y-%m-%d')}, {platform.node()} ({os.cpu_count()} cores)\n")  # fmt: skip
    print("| case (speeds) | policy | run | makespan (simulated s) | capacity lower bound (s) | makespan / bound "
          "| 250-token-batch bound (s) | makespan / that bound |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for (case, policy, run), (makespan, bound, loose) in rows.items():
        speeds = ", ".join(f"{s:g}" for s in CASES[case])
        print(f"| {case} ({speeds}) | {policy} | {run} | {makespan:.1f} | {bound:.1f} | {makespan / bound:.2f} "
              f"| {loose:.1f} | {makespan / loose:.2f} |")  # fmt: skip
    print()
    for case in cases:
        pairs = [(rows[key], rows[case, Policy.ROUND_ROBIN, key[2]]) for key in rows
                 if key[:2] == (case, Policy.LEAST_LOADED) and (case, Policy.ROUND_ROBIN, key[2]) in rows]  # fmt: skip
        if pairs:
            ratios = ", ".join(f"{ll[0] / rr[0]:.2f}" for ll, rr in pairs)
            print(f"{case}: least-loaded / round-robin = {ratios}")


def write_timelines(args: argparse.Namespace, timelines: list[dict[str, Any]]) -> None:
    doc = {"prompts": args.prompts, "samples": args.samples, "time_scale": float(args.time_scale),
           "interval_s": args.timeline_interval, "runs": timelines}  # fmt: skip
    args.timeline.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    cpu_s = sum(entry["reader_cpu_s"] for entry in timelines)
    print(f"\n--timeline: each server's /metrics read every {args.timeline_interval:g} s (wall) during each run "
          f"({cpu_s:.1f} s of CPU in all, in this process)")  # fmt: skip
    print(f"balance: wrote the timelines to {args.timeline}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
