"""One continuous-batching engine on a virtual clock: what vLLM's scheduler does, in simulated time.

Each `step()`:
1. Decoding sequences each need one more KV slot. If the KV cache cannot hold them, the newest
   running request is preempted (recompute: its KV is dropped, it goes back to the head of the
   queue, and its prompt and the tokens it already generated are prefilled again when it returns).
2. The token budget (`max_num_batched_tokens`) goes first to one token per decoding sequence, then
   to prefill chunks (chunked prefill): requests already prefilling, then new requests from the
   queue in arrival order, while `max_num_seqs` and the KV cache allow.
3. The step's time comes from the profile's StepModel; the clock advances by it; every decoding
   sequence gains a token, and a request whose prefill completed gains its first token per choice.

Prefix caching works on 16-token blocks with chained hashes, as vLLM's does: the longest cached
prefix of a prompt is not prefilled again. The n choices of a request share one prefill and one copy
of the prompt's KV. Blocks of finished requests stay cached until their space is needed (LRU).

Cost per step does not grow with the batch: a global decode counter advances all decoding
sequences at once, and a heap yields the ones that finish.

Pausing, as vLLM's scheduler pause states: "paused_new" admits nothing from the queue (requests
already running go on, so they drain), "paused_all" schedules nothing at all (running requests keep
their place and their KV, and go on where they were once unpaused).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mvllm_sim.profiles import StepModel

BLOCK = 16
PauseState = Literal["unpaused", "paused_new", "paused_all"]


@dataclass(eq=False)
class SimRequest:
    """A request of n choices. `targets[i]` is how many tokens choice i will generate."""

    prompt_ids: Sequence[int]
    targets: Sequence[int]
    stream: bool = False
    stream_interval: int = 1  # streamed: progress is reported every this many tokens (and at each choice's end)
    arrival: float = 0.0
    # filled in by the engine
    id: int = 0
    state: str = "new"  # new, waiting, running, finished, aborted
    block_hashes: tuple[int, ...] = ()
    generated: list[int] = field(default_factory=list)  # per choice, as of `d0`
    d0: int = 0  # the engine's decode counter when the current decode phase began
    decoding: bool = False
    prefill_left: int = 0
    active: int = 0  # choices not finished
    cached_tokens: int = 0  # prefix-cache hit at the last admission
    epoch: int = 0  # bumped on preemption, to drop stale heap entries
    first_token_at: float | None = None
    scheduled_at: float | None = None  # first admitted to the batch: its time in the queue ends
    finished_at: float | None = None
    choice_done: list[bool] = field(default_factory=list)
    preemptions: int = 0
    notified: int = 0  # the decode counter when progress was last reported

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def n(self) -> int:
        return len(self.targets)


@dataclass
class Counters:
    """Monotonic totals, as vLLM's Prometheus counters report them."""

    prompt_tokens: int = 0  # prompt tokens of admitted requests (first admission only)
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found
    preemptions: int = 0
    finished_requests: int = 0
    steps: int = 0


class Engine:
    def __init__(self, model: StepModel, max_num_seqs: int, max_num_batched_tokens: int, kv_tokens: int) -> None:
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_capacity = kv_tokens
        self.now = 0.0
        self.pause: PauseState = "unpaused"
        self.counters = Counters()
        self.on_finish: Callable[[SimRequest], None] = lambda req: None
        self.on_progress: Callable[[SimRequest], None] = lambda req: None
        self._ids = itertools.count(1)
        self._waiting: deque[SimRequest] = deque()
        self._running: dict[int, SimRequest] = {}  # admission order: the last is the newest
        self._prefilling: deque[SimRequest] = deque()
        self._streaming: dict[int, SimRequest] = {}
        self._finish_heap: list[tuple[int, int, int, int, SimRequest]] = []
        self._heap_seq = itertools.count()
        self._decode_counter = 0
        self._n_decoding = 0  # decoding sequences
        self._n_running_seqs = 0
        self._n_waiting_seqs = 0
        self._context_sum = 0  # prompt + generated over decoding sequences
        self._kv_used = 0  # tokens held by running requests
        self._block_refs: dict[int, int] = {}
        self._cached_free: OrderedDict[int, None] = OrderedDict()

    # --- what the server and /metrics read ------------------------------------------------------

    @property
    def num_running(self) -> int:
        return self._n_running_seqs

    @property
    def num_waiting(self) -> int:
        return self._n_waiting_seqs

    @property
    def kv_usage(self) -> float:
        return self._kv_used / self.kv_capacity

    @property
    def idle(self) -> bool:
        """Nothing to step: no request, or none that the pause lets run."""
        if self.pause == "paused_all":
            return True
        return not self._running and (self.pause == "paused_new" or not self._waiting)

    def generated_now(self, req: SimRequest, choice: int) -> int:
        """Tokens choice `choice` of `req` has generated so far."""
        if req.decoding:
            return min(req.targets[choice], req.generated[choice] + self._decode_counter - req.d0)
        return req.generated[choice]

    # --- requests in and out --------------------------------------------------------------------

    def add(self, req: SimRequest) -> SimRequest:
        req.id = next(self._ids)
        req.arrival = self.now
        req.state = "waiting"
        req.generated = [0] * req.n
        req.choice_done = [False] * req.n
        req.active = req.n
        req.block_hashes = _block_hashes(req.prompt_ids)
        self._waiting.append(req)
        self._n_waiting_seqs += req.n
        return req

    def abort(self, req: SimRequest) -> None:
        """Drop a request whose client went away; frees its sequences and KV."""
        if req.state == "waiting":
            self._waiting.remove(req)
            self._n_waiting_seqs -= req.active
        elif req.state == "running":
            self._release(req)
        req.state = "aborted"

    def reset_prefix_cache(self, reset_running: bool = False) -> bool:
        """Forget every cached prefix, as vLLM's: with `reset_running`, the running requests are first
        preempted (recomputed when they run again; the oldest stays first in the queue); without, the
        reset fails (False) while a running request holds KV."""
        if reset_running:
            for req in reversed(list(self._running.values())):
                self._preempt(req)
        if self._running:
            return False
        self._cached_free.clear()
        return True

    # --- the step -------------------------------------------------------------------------------

    def step(self) -> float | None:
        """Run one engine step; return its simulated duration, or None when there is nothing to do."""
        if self.pause == "paused_all":
            return None
        self._make_room_for_decode()
        budget = self.max_num_batched_tokens - self._n_decoding
        prefill_tokens, prefilled = self._schedule_prefill(budget)
        if self._n_decoding == 0 and prefill_tokens == 0:
            return None
        batch = self._n_decoding + sum(r.active for r in prefilled)
        dt = self.model.step_time(self._n_decoding + prefill_tokens, self._context_sum, batch)
        self.now += dt
        self.counters.steps += 1
        self._advance_decode()
        for req in prefilled:
            if req.prefill_left == 0:
                self._start_decode(req)
        self._pop_finished()
        counter = self._decode_counter
        for req in list(self._streaming.values()):
            if req.decoding and counter - req.notified >= req.stream_interval:
                req.notified = counter
                self.on_progress(req)
        return dt

    def _make_room_for_decode(self) -> None:
        while self._kv_used + self._n_decoding > self.kv_capacity and len(self._running) > 1:
            self._preempt(next(reversed(self._running.values())))

    def _schedule_prefill(self, budget: int) -> tuple[int, list[SimRequest]]:
        total, touched = 0, []
        for req in self._prefilling:
            if budget <= 0:
                break
            chunk = min(req.prefill_left, budget)
            req.prefill_left -= chunk
            budget -= chunk
            total += chunk
            touched.append(req)
        admitting = self.pause == "unpaused"
        while admitting and budget > 0 and self._waiting and self._can_admit(self._waiting[0]):
            req = self._waiting.popleft()
            self._admit(req)
            chunk = min(req.prefill_left, budget)
            req.prefill_left -= chunk
            budget -= chunk
            total += chunk
            touched.append(req)
        while self._prefilling and self._prefilling[0].prefill_left == 0:
            self._prefilling.popleft()
        return total, touched

    def _can_admit(self, req: SimRequest) -> bool:
        if self._n_running_seqs + req.active > self.max_num_seqs:
            return False
        shared = BLOCK * sum(1 for h in req.block_hashes if h in self._block_refs)
        need = req.prompt_len - shared + sum(req.generated) + req.active
        # The running sequences grow by one token each in this step too. Alone, a request is admitted
        # whatever it needs (it cannot wait for room that nobody will free); max_model_len <= the KV
        # capacity is checked at start-up, as vLLM does.
        return self._kv_used + self._n_decoding + need <= self.kv_capacity or not self._running

    def _admit(self, req: SimRequest) -> None:
        hits, chained = 0, True
        for h in req.block_hashes:
            if h in self._block_refs:
                self._block_refs[h] += 1
                found = True
            else:
                found = self._cached_free.pop(h, False) is None  # a cached block nobody holds
                self._block_refs[h] = 1
                self._kv_used += BLOCK
            chained = chained and found
            hits += BLOCK if chained else 0
        if req.preemptions == 0:
            self.counters.prompt_tokens += req.prompt_len
            req.scheduled_at = self.now
        self.counters.prefix_cache_queries += req.prompt_len
        self.counters.prefix_cache_hits += hits
        req.cached_tokens = hits
        self._kv_used += req.prompt_len % BLOCK + sum(req.generated)
        # Recompute preemption: tokens generated before a preemption are prefilled again. The last
        # prompt token is always computed, as in vLLM, to sample from.
        req.prefill_left = max(1, req.prompt_len - hits + sum(req.generated))
        req.state = "running"
        self._running[req.id] = req
        self._prefilling.append(req)
        self._n_waiting_seqs -= req.active
        self._n_running_seqs += req.active
        self._evict_cached_free()
        if req.stream:
            self._streaming[req.id] = req

    def _start_decode(self, req: SimRequest) -> None:
        if req.first_token_at is None:
            req.first_token_at = self.now
        req.decoding = True
        req.d0 = self._decode_counter
        req.notified = self._decode_counter - req.stream_interval  # the first token is reported at once
        for i, target in enumerate(req.targets):
            if req.choice_done[i]:
                continue
            req.generated[i] += 1  # the step that completes the prefill samples the first token
            self._n_decoding += 1
            self._context_sum += req.prompt_len + req.generated[i]
            self._kv_used += 1
            self.counters.generation_tokens += 1
            finish_at = self._decode_counter + (target - req.generated[i])
            heapq.heappush(self._finish_heap, (finish_at, next(self._heap_seq), req.epoch, i, req))

    def _advance_decode(self) -> None:
        self._decode_counter += 1
        self._kv_used += self._n_decoding
        self._context_sum += self._n_decoding
        self.counters.generation_tokens += self._n_decoding

    def _pop_finished(self) -> None:
        heap = self._finish_heap
        while heap and heap[0][0] <= self._decode_counter:
            _, _, epoch, choice, req = heapq.heappop(heap)
            if epoch != req.epoch or req.state != "running":
                continue  # the request was preempted or aborted after this entry was made
            self._finish_choice(req, choice)

    def _finish_choice(self, req: SimRequest, choice: int) -> None:
        target = req.targets[choice]
        req.choice_done[choice] = True
        self._n_decoding -= 1
        self._n_running_seqs -= 1
        self._context_sum -= req.prompt_len + target
        req.active -= 1
        if req.active and req.stream:
            self.on_progress(req)  # a choice's end is reported at once
        if req.active == 0:
            req.generated = self._release(req)
            req.state = "finished"
            req.finished_at = self.now
            self.counters.finished_requests += 1
            self.on_finish(req)

    def _preempt(self, req: SimRequest) -> None:
        """Recompute preemption of `req`: drop its KV, keep its tokens, requeue it at the head."""
        req.generated = self._release(req)
        req.state = "waiting"
        req.epoch += 1
        req.preemptions += 1
        self.counters.preemptions += 1
        self._waiting.appendleft(req)
        self._n_waiting_seqs += req.active

    def _release(self, req: SimRequest) -> list[int]:
        """Take a running request out of the batch and free its KV (its blocks stay cached).

        Returns the tokens each choice had generated."""
        generated = [self.generated_now(req, i) for i in range(req.n)]
        if req.decoding:
            for i in range(req.n):
                if not req.choice_done[i]:
                    self._n_decoding -= 1
                    self._context_sum -= req.prompt_len + generated[i]
        req.decoding = False
        self._kv_used -= req.prompt_len % BLOCK + sum(generated)
        for h in reversed(req.block_hashes):  # the tail of a prompt is evicted first: its head stays matchable
            refs = self._block_refs[h] - 1
            if refs:
                self._block_refs[h] = refs
            else:
                del self._block_refs[h]
                self._kv_used -= BLOCK
                self._cached_free[h] = None
        self._n_running_seqs -= req.active
        del self._running[req.id]
        self._streaming.pop(req.id, None)
        if req in self._prefilling:
            self._prefilling.remove(req)
        self._evict_cached_free()
        return generated

    def _evict_cached_free(self) -> None:
        while self._cached_free and self._kv_used + BLOCK * len(self._cached_free) > self.kv_capacity:
            self._cached_free.popitem(last=False)


def _block_hashes(ids: Sequence[int]) -> tuple[int, ...]:
    """Chained hashes of the prompt's full 16-token blocks: a block matches only with all before it."""
    hashes, parent = [], 0
    for start in range(0, len(ids) - len(ids) % BLOCK, BLOCK):
        parent = hash((parent, tuple(ids[start : start + BLOCK])))
        hashes.append(parent)
    return tuple(hashes)
