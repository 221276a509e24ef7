"""What the front door's balance and sessions benchmarks share: a fleet of simulators of given speeds
behind mvllmd's front door, a load of multi-turn sessions at a fixed concurrency, and the servers'
counters read from their /metrics.

A session is an agent's conversation: a context of its own (a system prompt and a task), then turns;
each turn's prompt is the previous turn's prompt, its answer and the user's next words, so that each
turn's prompt extends the last one's (a server that served the last turn holds its prefix). Sessions
run --concurrency at a time; a session's turns go one after the other, and a session that ends makes
room for the next. Requests are non-streamed `/v1/completions`, no seed, as an OpenAI client sends
them, over mvllmd's own keep-alive HTTP client (transport/http.py); where they go is a Route:

- through the front door, with `X-Session-ID` (sticky least-loaded) or without (least-loaded);
- straight to the servers: round robin by request, or a hash of the session (crc32 mod servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from mvllmd.transport import http

from benchkit import free_port, mvllmd

MODEL = "sim"
HEADERS = {"Content-Type": "application/json"}
COUNTERS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:generation_tokens_total",
            "vllm:prompt_tokens_total", "vllm:num_preemptions_total")  # fmt: skip


@dataclass(frozen=True)
class Fleet:
    front: str  # the front door's base URL
    servers: list[str]  # the simulators' base URLs, in the order of `speeds`
    speeds: tuple[float, ...]
    pids: list[int]


@contextlib.contextmanager
def fleet(speeds: Sequence[float], time_scale: float, engine_args: Sequence[str] = ()) -> Iterator[Fleet]:
    """mvllmd with one mvllm-sim instance per speed (model "sim"), its front door on a free port; all
    stopped after, whatever happens."""
    port = free_port()
    with mvllmd(len(speeds), "--http-listen", f"http://127.0.0.1:{port}") as daemon:
        servers, pids = [], []
        for speed in speeds:
            args = ["--speed", f"{speed:g}", "--time-scale", f"{time_scale:g}", *engine_args]
            (instance,) = daemon.launch(MODEL, 1, engine_args=args)
            servers.append(instance.url.removesuffix("/v1"))
            pids.append(instance.pid)
        yield Fleet(f"http://127.0.0.1:{port}", servers, tuple(speeds), pids)


# --- sessions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    id: str
    context: str  # the first turn's prompt
    turns: int


def words(rng: random.Random, count: int) -> str:
    """COUNT words of a user's text (not the simulator's own words: a prompt that ended in those would
    be read as an answer to continue)."""
    return " ".join(f"u{rng.randrange(100_000)}" for _ in range(count))


def sessions(count: int, turns: Callable[[random.Random], int], context_words: int, salt: str,
             seed: int = 1) -> list[Session]:  # fmt: skip
    """COUNT sessions with contexts of CONTEXT_WORDS words and TURNS(rng) turns each. SALT makes their
    text differ from another run's, so that no run finds another's prefixes in the servers' caches."""
    rng = random.Random(seed)  # noqa: S311  (a workload, not a secret)
    return [Session(f"{salt}-{i}", f"Session {salt} {i}. {words(rng, context_words)}", turns(rng))
            for i in range(count)]  # fmt: skip


@dataclass
class Route:
    """Where each turn goes: the pool and headers for (session, turn number)."""

    name: str
    pick: Callable[[Session], tuple[http.Pool, dict[str, str]]]


def routes(client: http.Client, found: Fleet) -> dict[str, Route]:
    front = client.pool(found.front)
    servers = [client.pool(url) for url in found.servers]
    turn = itertools.count()
    return {
        "front door, X-Session-ID (sticky least-loaded)": Route(
            "sticky", lambda s: (front, {**HEADERS, "X-Session-ID": s.id})
        ),
        "front door, no session (least-loaded)": Route("least-loaded", lambda s: (front, HEADERS)),
        "straight, hash of the session": Route(
            "hash", lambda s: (servers[zlib.crc32(s.id.encode()) % len(servers)], HEADERS)
        ),
        "straight, round robin by request": Route(
            "round-robin", lambda _: (servers[next(turn) % len(servers)], HEADERS)
        ),
    }


@dataclass
class Outcome:
    wall_s: float = 0.0
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    chain_tokens: list[int] = field(default_factory=list)  # each session's completion tokens, summed
    errors: int = 0
    first_error: str = ""


async def drive(all_sessions: list[Session], route: Route, concurrency: int, max_tokens: int,
                next_words: int) -> Outcome:  # fmt: skip
    """Run every session, CONCURRENCY at a time, through ROUTE; what came back."""
    out = Outcome()
    queue = iter(all_sessions)
    rng = random.Random(7)  # noqa: S311

    async def one(session: Session) -> None:
        prompt, made = session.context, 0
        for _ in range(session.turns):
            pool, headers = route.pick(session)
            body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}).encode()
            try:
                response = await pool.post("/v1/completions", body, headers)
            except (http.HttpError, OSError) as exc:
                out.errors += 1
                out.first_error = out.first_error or f"{type(exc).__name__}: {exc}"
                return
            if response.status != 200:
                out.errors += 1
                out.first_error = out.first_error or f"HTTP {response.status}: {response.body[:200]!r}"
                return
            answer = json.loads(response.body)
            usage = answer["usage"]
            out.prompt_tokens.append(usage["prompt_tokens"])
            out.completion_tokens.append(usage["completion_tokens"])
            made += usage["completion_tokens"]
            prompt = f"{prompt} {answer['choices'][0]['text']} {words(rng, next_words)}"
        out.chain_tokens.append(made)

    async def worker() -> None:
        for session in queue:
            await one(session)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out.wall_s = time.monotonic() - started
    return out


# --- the servers' counters ------------------------------------------------------------------------


async def counters(client: http.Client, urls: Sequence[str]) -> list[dict[str, float]]:
    """COUNTERS of each server, from its /metrics (summed over label sets)."""
    got = []
    for url in urls:
        response = await client.pool(url).get("/metrics", {})
        values = dict.fromkeys(COUNTERS, 0.0)
        for line in response.body.decode().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in values:
                values[name] += float(line.rsplit(" ", 1)[1])
        got.append(values)
    return got


def deltas(before: list[dict[str, float]], after: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: a[k] - b[k] for k in a} for b, a in zip(before, after, strict=True)]


def hit_rate(per_server: list[dict[str, float]]) -> float:
    hits = sum(s["vllm:prefix_cache_hits_total"] for s in per_server)
    queries = sum(s["vllm:prefix_cache_queries_total"] for s in per_server)
    return hits / queries if queries else 0.0


def token_shares(per_server: list[dict[str, float]]) -> str:
    """Each server's share of the generated tokens, in percent, in the fleet's order."""
    total = sum(s["vllm:generation_tokens_total"] for s in per_server) or 1.0
    return " / ".join(f"{100 * s['vllm:generation_tokens_total'] / total:.0f}" for s in per_server)
