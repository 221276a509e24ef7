"""Sessions through the front door: sticky least-loaded against least-loaded alone and pure hashing.

    .venv/bin/python benchmarks/front_door_sessions.py [--sessions 400] [--turns 2-8] [--concurrency 256]
        [--context 1000] [--max-tokens 128] [--time-scale 0.5] [--speeds 1,1,0.5,0.25]

mvllmd launches one mvllm-sim instance per speed and serves them through its front door. A multi-turn
load where prefix reuse matters (front_door_kit.py): --sessions agent sessions, --concurrency at a time,
each with a context of its own of about --context tokens and a number of turns drawn from --turns; each
turn's prompt is the last turn's prompt, its answer (at most --max-tokens) and 30 new words. The
simulator caches prompts' 16-token blocks as vLLM does, so a turn that goes where the session's last
turn went prefills only what is new; elsewhere it prefills all of it. The same load (its own text each
run, so that no run finds another's prefixes cached) three ways:

- sticky least-loaded: every turn to the front door with the session's `X-Session-ID`;
- least-loaded: every turn to the front door without it;
- hashing: the generator sends each turn straight to server crc32(session) mod 4, as a router that
  hashes sessions does.

Prefix hit rate is the servers' own: the growth of vllm:prefix_cache_hits_total over that of
vllm:prefix_cache_queries_total (tokens), summed over the servers, in each run. Makespan is on the
simulators' clock: wall time from the first request to the last answer, divided by --time-scale.
Servers of unequal speeds by default (balance.py's fleet): hashing splits sessions evenly, whatever a
server's speed, where the front door weighs load by each server's measured speed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from front_door_kit import Fleet, counters, deltas, drive, fleet, hit_rate, routes, sessions, token_shares

from mvllmd.transport import http

from benchkit import exit_on_sigterm, load_average, machine, print_table

ROUTES = ("front door, X-Session-ID (sticky least-loaded)", "front door, no session (least-loaded)",
          "straight, hash of the session")  # fmt: skip
NEW_WORDS = 30  # the user's words in each turn after the first


async def run(found: Fleet, args: argparse.Namespace, low: int, high: int) -> list[list[str]]:
    client = http.Client()
    rows, first = [], 0.0
    try:
        for n, name in enumerate(ROUTES):
            load = sessions(args.sessions, lambda rng: rng.randint(low, high), args.context, salt=f"s{n}")
            print(f"{name} ...", file=sys.stderr, flush=True)
            before = await counters(client, found.servers)
            outcome = await drive(load, routes(client, found)[name], args.concurrency, args.max_tokens, NEW_WORDS)
            used = deltas(before, await counters(client, found.servers))
            if outcome.errors:
                print(f"{name}: {outcome.errors} errors, the first: {outcome.first_error}", file=sys.stderr)
            makespan = outcome.wall_s / args.time_scale
            first = first or makespan
            prefilled = sum(s["vllm:prefix_cache_queries_total"] - s["vllm:prefix_cache_hits_total"] for s in used)
            rows.append([name, f"{100 * hit_rate(used):.1f}", f"{prefilled / 1e6:.2f}", f"{makespan:.1f}",
                         f"{makespan / first:.2f}", token_shares(used), f"{len(outcome.completion_tokens):,}",
                         str(outcome.errors)])  # fmt: skip
    finally:
        client.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=400)
    p.add_argument("--turns", default="2-8", help="turns per session, drawn uniformly from LOW-HIGH [2-8]")
    p.add_argument("--concurrency", type=int, default=256, help="sessions at a time [256]")
    p.add_argument("--context", type=int, default=1000, help="words of each session's own context [1000]")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--time-scale", type=float, default=0.5)
    p.add_argument("--speeds", default="1,1,0.5,0.25", help="the servers' speeds [1,1,0.5,0.25]")
    p.add_argument("--kv-tokens", type=int, default=200_000, help="each server's KV cache, in tokens [200000]")
    args = p.parse_args()
    exit_on_sigterm()
    low, _, high = args.turns.partition("-")
    turns = (int(low), int(high or low))
    speeds = tuple(float(s) for s in args.speeds.split(","))
    header = (f"front-door sessions, {args.sessions:,} sessions of {turns[0]}-{turns[1]} turns, {args.concurrency} at "
              f"a time, contexts of {args.context} words, {NEW_WORDS} new words a turn, max_tokens {args.max_tokens}, "
              f"servers of speeds {', '.join(f'{s:g}' for s in speeds)}, {args.kv_tokens:,} KV tokens each, "
              f"at --time-scale {args.time_scale:g} "
              f"(makespans on the simulated clock); {time.strftime('%Y-%m-%d %H:%M %Z')}; {machine()}; "
              f"{load_average()} at the start")  # fmt: skip
    engine_args = ["--kv-tokens", str(args.kv_tokens), "--max-model-len", str(min(32768, args.kv_tokens))]
    with fleet(speeds, args.time_scale, engine_args) as found:
        rows = asyncio.run(run(found, args, *turns))
    print(header + "\n")
    print_table(["route", "prefix hit rate (%)", "tokens prefilled (M)", "makespan (simulated s)",
                 "vs sticky", "servers' share of tokens (%)", "requests", "errors"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
