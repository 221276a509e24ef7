"""Balance through the front door: servers of speeds 1, 1, 0.5 and 0.25, a load of many sessions.

    .venv/bin/python benchmarks/front_door_balance.py [--sessions 1000] [--turns 3] [--concurrency 512]
        [--max-tokens 1024] [--time-scale 0.5] [--speeds 1,1,0.5,0.25]

mvllmd launches one mvllm-sim instance per speed (balance.py's fleet) and serves them through its front
door. A load like an OpenAI client's in an agent loop (front_door_kit.py): --sessions sessions of
--turns turns, --concurrency sessions at a time, each turn a non-streamed completion (no seed, the
simulator's long-tailed lengths capped at --max-tokens) whose prompt extends the last turn's prompt
and answer. The same load (its own text each run, so that no run finds another's prefixes cached)
two ways:

- front door: every turn to mvllmd's front door with the session's `X-Session-ID` (sticky
  least-loaded over the four);
- round robin: the generator sends request i to server i mod 4 itself, no proxy.

Makespan is on the simulators' clock: wall time from the first request to the last answer, divided by
--time-scale. The capacity bound is the jobs' (balance.py's work_bound_s): the work of the tokens that
came back (each answer's prompt and completion tokens, priced by the simulator's step model at full
batch) over the servers' summed speed, or, if longer, the longest session's turns one after another
at batch 1 on the fastest server. No schedule beats it; at a fixed concurrency no server runs full
batches, so it is not reachable here (the jobs' benchmark keeps 4,096 samples in flight). Also shown:
each server's share of the generated tokens (its speed's share is 36 / 36 / 18 / 9 %).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from balance import work_bound_s
from front_door_kit import Fleet, Outcome, counters, deltas, drive, fleet, routes, sessions, token_shares

from mvllm_sim.profiles import step_model
from mvllmd.transport import http

from benchkit import exit_on_sigterm, load_average, machine, print_table

ROUTES = ("front door, X-Session-ID (sticky least-loaded)", "straight, round robin by request")


def bound_s(outcome: Outcome, speeds: tuple[float, ...]) -> float:
    per_token_s = step_model("h100-8b").step_time(1, 300, 1) / max(speeds)  # one sequence alone
    work = work_bound_s(outcome.prompt_tokens, outcome.completion_tokens, speeds)
    return max(work, max(outcome.chain_tokens, default=0) * per_token_s)


async def run(found: Fleet, args: argparse.Namespace) -> list[list[str]]:
    client = http.Client()
    rows, first = [], 0.0
    try:
        for n, name in enumerate(ROUTES):
            load = sessions(args.sessions, lambda _: args.turns, 24, salt=f"b{n}")
            print(f"{name} ...", file=sys.stderr, flush=True)
            before = await counters(client, found.servers)
            outcome = await drive(load, routes(client, found)[name], args.concurrency, args.max_tokens, 12)
            used = deltas(before, await counters(client, found.servers))
            if outcome.errors:
                print(f"{name}: {outcome.errors} errors, the first: {outcome.first_error}", file=sys.stderr)
            makespan, bound = outcome.wall_s / args.time_scale, bound_s(outcome, found.speeds)
            first = first or makespan
            rows.append([name, f"{makespan:.1f}", f"{bound:.1f}", f"{makespan / bound:.2f}", f"{makespan / first:.2f}",
                         token_shares(used), f"{len(outcome.completion_tokens):,}", str(outcome.errors)])  # fmt: skip
    finally:
        client.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=512, help="sessions at a time [512]")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--time-scale", type=float, default=0.5)
    p.add_argument("--speeds", default="1,1,0.5,0.25", help="the servers' speeds [1,1,0.5,0.25]")
    args = p.parse_args()
    exit_on_sigterm()
    speeds = tuple(float(s) for s in args.speeds.split(","))
    header = (f"front-door balance, {args.sessions:,} sessions x {args.turns} turns, {args.concurrency} sessions at a "
              f"time, max_tokens {args.max_tokens}, servers of speeds {', '.join(f'{s:g}' for s in speeds)} at "
              f"--time-scale {args.time_scale:g} (makespans on the simulated clock); "
              f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {machine()}; {load_average()} at the start")  # fmt: skip
    with fleet(speeds, args.time_scale) as found:
        rows = asyncio.run(run(found, args))
    print(header + "\n")
    print_table(["route", "makespan (simulated s)", "capacity bound (s)", "makespan / bound", "vs the front door",
                 "servers' share of tokens (%)", "requests", "errors"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
