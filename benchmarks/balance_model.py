"""A model of the balance benchmark on one simulated clock, to try dispatch policies in seconds.

    .venv/bin/python benchmarks/balance_model.py [--seeds 3]

Four of mvllm-sim's engines (profile h100-8b at speeds 1, 1, 0.5 and 0.25) run in this process on one
clock, with no HTTP and no wall time: the engine with the earliest clock steps next, and after each
step the policy places work. The workload is balance.py's (2,000 prompts x 8 samples, lengths
lognormal with the simulator's defaults, capped at 2,048), one sample per request, and the bound is
balance.py's exact work bound. It is a research tool for the open balance goal (makespan at most 1.2
x the bound), not a measurement of mvllmd: its policies see the engines' true speeds and steps where
the dispatcher estimates them from /metrics.

Policies (each engine holds at most its share of 1,024 in proportion to its speed, and the least
loaded per unit of speed gets the next sample):
- `migrate` with `by_batch`: the dispatcher's rule for unseeded jobs. Once the queue is empty, running
  samples move, with the tokens they have made (known in chunks of `interval`, as a stream shows them),
  onto an engine at least `gain` times faster with room, when a token would take `gain` times less
  there, a token's time taken as max(batch, `min_batch`) over the engine's speed; the slowest
  engines' samples first, each engine's oldest first. The new request's prompt is the old one's prompt
  and tokens (prefilled again), and it generates the rest.
- `migrate` alone: the same, judged by the engines' true decode steps (which a dispatcher does not see).
- no `migrate`: the tail's running samples are copied (hedged) onto engines whose step is `gain` times
  shorter, the first answer winning: the dispatcher's rule for seeded jobs, whose copies are the same
  samples (and its rule for all jobs before moves); with `fastest_only`, copies go to the fastest.
- longest first: a clairvoyant reference that knows every length and sends the longest first, with
  the same limits and with half of them.
- tried and not taken (neither ends below 1.2 x the bound on every workload): lower limits once the
  queue is short (`late_queue`, `late_capacity`), and, when the queue runs dry, aborting the newest
  requests beyond `shed_to` per engine (they go back to the queue).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from mvllm_sim.engine import Engine, SimRequest
from mvllm_sim.profiles import step_model

SPEEDS = (1.0, 1.0, 0.5, 0.25)
PROMPTS, SAMPLES, MAX_TOKENS, PROMPT_TOKENS, CAPACITY = 2000, 8, 2048, 8, 1024


def workload(seed: int) -> list[list[int]]:
    rng = random.Random(seed)  # noqa: S311  (a workload, not a secret)
    return [[min(MAX_TOKENS, max(1, round(rng.lognormvariate(5.3, 0.8)))) for _ in range(SAMPLES)]
            for _ in range(PROMPTS)]  # fmt: skip


def bound_s(lengths: list[list[int]]) -> float:
    """balance.py's bound: the work priced at full batch over the summed speed, or the longest alone."""
    m = step_model("h100-8b")
    flat = [n for row in lengths for n in row]
    context = sum(PROMPT_TOKENS * n + n * (n - 1) // 2 for n in flat)
    per_token = m.per_token_s + m.per_seq_s + m.overhead_s / m.max_num_seqs
    work = (sum(flat) * per_token + context * m.per_ctx_token_s) / sum(SPEEDS)
    return max(work, max(flat) * m.step_time(1, 300, 1))


@dataclass
class Run:
    """One job over the engines; `policy` settings decide where samples and their copies go."""

    lengths: list[list[int]]
    gain: float = 2.0  # a copy goes where a token takes `gain` times less time
    fastest_only: bool = False  # copies go to the fastest engines only
    longest_first: bool = False  # clairvoyant: the queue sorted by length
    capacity: int = CAPACITY  # what the fastest engine may hold; the others in proportion to speed
    late_queue: int = 0  # once fewer samples than this are queued, the capacity is late_capacity
    late_capacity: int = CAPACITY
    shed_to: int | None = None  # when the queue runs dry, abort the newest requests beyond this
    migrate: bool = False  # when the queue runs dry, move running samples with their progress
    by_batch: bool = False  # migrate: judge a token's time by batch over speed, as the dispatcher does
    min_batch: int = 64  # by_batch: a batch counts as at least this
    interval: int = 1  # migrate: what a sample has made is known in multiples of this
    engines: list[Engine] = field(default_factory=list)

    def makespan(self) -> float:
        self.engines = [self._engine(s) for s in SPEEDS]
        self.inflight = [0] * len(SPEEDS)
        self.done: set[tuple[int, int]] = set()
        self.copies: dict[tuple[int, int], list[tuple[int, SimRequest]]] = {}
        self.hedged: set[tuple[int, int]] = set()
        self._keys: dict[int, tuple[int, int]] = {}  # id() of a request -> its sample
        keys = [(p, s) for p in range(PROMPTS) for s in range(SAMPLES)]
        if self.longest_first:
            keys.sort(key=lambda k: -self.lengths[k[0]][k[1]])
        self.queue = collections.deque(keys)
        self._shed = False
        self._made = itertools.count(1)  # ids for tokens that moved: negative, so unlike any prompt's
        for i, engine in enumerate(self.engines):
            engine.on_finish = self._on_finish(i)
        self._place(0.0)
        while len(self.done) < len(keys):
            busy = [e for e in self.engines if not e.idle]
            if not busy:
                self._place(max(e.now for e in self.engines))
                continue
            engine = min(busy, key=lambda e: e.now)
            engine.step()
            self._place(engine.now)
        return max(e.now for e in self.engines)

    @staticmethod
    def _engine(speed: float) -> Engine:
        m = step_model("h100-8b", speed=speed)
        return Engine(m, m.max_num_seqs, m.max_num_batched_tokens, m.kv_tokens)

    def _on_finish(self, i: int) -> Callable[[SimRequest], None]:
        def finished(request: SimRequest) -> None:
            self.inflight[i] -= 1
            key = self._keys[id(request)]
            if key in self.done:
                return
            self.done.add(key)
            for j, twin in self.copies.pop(key, []):
                if twin is not request and twin.state not in {"finished", "aborted"}:
                    self.engines[j].abort(twin)
                    self.inflight[j] -= 1

        return finished

    def _send(self, i: int, key: tuple[int, int], now: float) -> None:
        prompt = [key[0] * 100 + j for j in range(PROMPT_TOKENS)]
        self._add(i, key, now, prompt, self.lengths[key[0]][key[1]])

    def _add(self, i: int, key: tuple[int, int], now: float, prompt: list[int], target: int) -> None:
        engine = self.engines[i]
        if engine.idle:
            engine.now = max(engine.now, now)
        request = engine.add(SimRequest(prompt_ids=prompt, targets=[target]))
        self._keys[id(request)] = key
        self.inflight[i] += 1
        self.copies.setdefault(key, []).append((i, request))

    def _share(self, i: int) -> float:
        capacity = self.capacity
        if self._shed and self.shed_to is not None:
            capacity = self.shed_to
        elif len(self.queue) < self.late_queue:
            capacity = self.late_capacity
        return capacity * SPEEDS[i] / max(SPEEDS)

    def _step(self, i: int) -> float:
        e = self.engines[i]
        return e.model.step_time(max(1, e.num_running), e._context_sum, max(1, e.num_running))

    def _place(self, now: float) -> None:
        if not self.queue and self.shed_to is not None and not self._shed:
            self._shed = True
            self._shed_newest()
        while self.queue:
            room = [i for i in range(len(SPEEDS)) if self.inflight[i] < self._share(i)]
            if not room:
                break
            key = self.queue.popleft()
            if key not in self.done:
                self._send(min(room, key=lambda i: (self.inflight[i] + 1) / SPEEDS[i]), key, now)
        if not self.queue:
            self._copy(now)

    def _copy(self, now: float) -> None:
        if self.migrate:
            self._migrate(now)
            return
        fastest = [i for i in range(len(SPEEDS)) if SPEEDS[i] == max(SPEEDS)]
        targets = fastest if self.fastest_only else range(len(SPEEDS))
        for i in sorted(targets, key=self._step):
            while self.inflight[i] < self._share(i):
                running = [(j, r) for j in range(len(SPEEDS)) if j != i and self._step(i) * self.gain <= self._step(j)
                           for r in self.engines[j]._running.values()
                           if self._keys[id(r)] not in self.hedged and self._keys[id(r)] not in self.done]  # fmt: skip
                if not running:
                    break
                _, oldest = min(running, key=lambda jr: jr[1].arrival)
                self.hedged.add(self._keys[id(oldest)])
                self._send(i, self._keys[id(oldest)], now)

    def _migrate(self, now: float) -> None:
        while moving := self._movable():
            j, request, i = moving
            made = self.engines[j].generated_now(request, 0)
            made -= made % self.interval
            key = self._keys[id(request)]
            self.engines[j].abort(request)
            self.inflight[j] -= 1
            self.copies[key] = [(e, r) for e, r in self.copies.get(key, []) if r is not request]
            # The tokens made go with the prompt (ids of their own, so no cache hit elsewhere).
            made_ids = [-next(self._made) for _ in range(made)]
            self._add(i, key, now, [*request.prompt_ids, *made_ids], request.targets[0] - made)

    def _movable(self) -> tuple[int, SimRequest, int] | None:
        """A running sample to move: its engine, itself, and the engine it goes to; None if none."""
        room = [i for i in range(len(SPEEDS)) if self.inflight[i] < self._share(i)]
        if not self.by_batch:  # the fastest step first; the oldest sample where a step is gain times longer
            for i in sorted(room, key=self._step):
                running = [(j, r) for j in range(len(SPEEDS)) if j != i and self._step(i) * self.gain <= self._step(j)
                           for r in self.engines[j]._running.values() if r.decoding and r.targets[0] > 1]  # fmt: skip
                if running:
                    j, oldest = min(running, key=lambda jr: jr[1].arrival)
                    return j, oldest, i
            return None

        def token_s(k: int, more: int) -> float:
            return max(self.inflight[k] + more, self.min_batch) / SPEEDS[k]

        # As the dispatcher: the slowest engine's oldest sample first, to the quickest engine with room.
        for j in sorted(range(len(SPEEDS)), key=lambda j: SPEEDS[j]):
            faster = [i for i in room if SPEEDS[i] >= SPEEDS[j] * self.gain]
            decoding = [r for r in self.engines[j]._running.values() if r.decoding and r.targets[0] > 1]
            if faster and decoding:
                i = min(faster, key=lambda i: token_s(i, 1))
                if token_s(i, 1) * self.gain <= token_s(j, 0):
                    return j, min(decoding, key=lambda r: r.arrival), i
        return None

    def _shed_newest(self) -> None:
        for i, engine in enumerate(self.engines):
            newest = sorted(engine._running.values(), key=lambda r: -r.arrival)
            for request in newest[: max(0, int(self.inflight[i] - self._share(i)))]:
                key = self._keys[id(request)]
                engine.abort(request)
                self.inflight[i] -= 1
                self.copies[key] = [(j, r) for j, r in self.copies.get(key, []) if r is not request]
                self.queue.append(key)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="workloads drawn [3]")
    args = p.parse_args()
    policies: dict[str, dict[str, object]] = {
        "moves where a token is 1.3x quicker, by batch over speed (the dispatcher's rule)": {
            "migrate": True,
            "by_batch": True,
            "gain": 1.3,
            "interval": 64,
        },
        "moves where a token is 1.3x quicker, by the true decode step": {"migrate": True, "gain": 1.3},
        "copies where a token is 2x quicker (the rule for seeded jobs)": {},
        "least-loaded, copies to the fastest engines where 1.5x quicker": {"gain": 1.5, "fastest_only": True},
        "longest first (clairvoyant), no copies": {"longest_first": True, "gain": float("inf")},
        "longest first (clairvoyant), no copies, half the batch": {
            "longest_first": True,
            "gain": float("inf"),
            "capacity": CAPACITY // 2,
        },
        "tried: a quarter of the batch once fewer than 2,000 samples are queued": {
            "late_queue": 2000,
            "late_capacity": CAPACITY // 4,
        },
        "tried: when the queue runs dry, the newest requests beyond 256 back to it": {"shed_to": 256},
    }
    print("| policy | " + " | ".join(f"makespan / bound, seed {s}" for s in range(1, args.seeds + 1)) + " |")
    print("|---|" + "---|" * args.seeds)
    loads = [workload(s) for s in range(1, args.seeds + 1)]
    for name, settings in policies.items():
        ratios = [Run(lengths, **settings).makespan() / bound_s(lengths) for lengths in loads]  # type: ignore[arg-type]
        print(f"| {name} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
