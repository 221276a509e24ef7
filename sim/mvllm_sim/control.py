"""The engine's controls that vLLM's development routes reach: pause and resume, sleep and wake up,
weights reload and version, prefix cache reset. The semantics are vLLM 0.32's (EngineCoreProc's
pause_scheduler, sleep and wake_up; the executor's sleeping tags; AsyncLLM); devroutes.py is the HTTP
side, and the server (the `Clients` here) does what reaches the clients.

Pause modes (vLLM's PauseMode):
  abort  every request in flight, running or queued, ends at once with finish_reason "abort" and the
         tokens it had made; then the pause holds.
  wait   nothing new is admitted; running requests go on to their end, and /pause answers when none
         runs. Queued requests, new or preempted meanwhile, stay queued.
  keep   nothing is stepped: running requests freeze where they are, and go on after /resume under
         the weights loaded by then.
With clear_cache (the default) the prefix cache is reset once the pause holds, its running requests
preempted first: under keep they keep their tokens and recompute their KV when resumed. vLLM does
this under keep too, though its docs say clear_cache is ignored there.
A request that arrives while paused (or asleep) queues, and runs after /resume or /wake_up.

The guarantee a client can build on: when /pause answers, no token will be made until the engine
resumes, and every token made before has been written to its stream (streams are flushed whatever
their stream_interval): what a client read of its stream before /pause answered is all that came
before the pause, and what it reads after came after.

Sleep (level 0-2) is a pause (mode as asked, by default abort; the cache cleared at level 1 and 2)
and then, at level 1 and 2, the weights and the KV cache go to sleep (the executor's tags "weights"
and "kv_cache"). Level 2 discards the weights: until a reload, words carry weights.DISCARDED_TAG.
/wake_up wakes the tags given (all by default; "scheduling" stands for the pause alone, and a tag
that is not asleep makes the whole call do nothing); once no tag sleeps, the engine resumes, so
/wake_up also lifts a plain pause. Asleep means paused or any tag asleep (vLLM's is_sleeping).

A reload occupies the engine for reload_s simulated seconds after the step under way (a utility
call between two steps, in vLLM), paused or not; every token made after it is the new weights'.

vLLM publishes its request gauges at each step, and a paused engine steps no more: they stay as they
were when the pause took hold (a frozen request still counts as running; a request that arrives
meanwhile is not counted) until it resumes. `gauges` holds them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal, Protocol

from mvllm_sim.engine import Engine
from mvllm_sim.runner import Runner
from mvllm_sim.weights import Weights, WeightsError, read_weights

log = logging.getLogger(__name__)

PauseMode = Literal["abort", "wait", "keep"]
SLEEP_TAGS = frozenset(("weights", "kv_cache"))


class Clients(Protocol):
    """What the controls need done to the requests in flight, on the server's side."""

    def abort_all(self) -> None:
        """End every request in flight now, with finish_reason "abort" and the tokens it made."""

    async def flush(self) -> None:
        """Write every token made so far to its stream; return once all are written."""

    def switch_weights(self, tag: int | None) -> None:
        """Tokens made from now on are made by weights of `tag`."""


class Control:
    """The controls of one engine, and what they leave: paused or not, tags asleep, weights, version."""

    def __init__(
        self,
        engine: Engine,
        runner: Runner,
        clients: Clients,
        *,
        weights: Weights,
        reload_s: float,
        workers: int,
        fail_reloads: bool = False,
    ) -> None:
        self.engine, self.runner, self.clients = engine, runner, clients
        self.weights = weights
        self.weight_version = "default"  # vLLM's until a caller sets one
        self.reload_s = reload_s
        self.fail_reloads = fail_reloads  # a fault: every reload fails
        self.workers = workers  # one result per tensor-parallel worker from collective_rpc
        self.sleeping: set[str] = set()
        self.sleep_state = (0, 0)  # vllm:engine_sleep_state: (asleep, level) as last recorded
        self.gauges: tuple[int, int] | None = None  # running and waiting when the pause took hold
        self._ended = asyncio.Event()

    @property
    def paused(self) -> bool:
        return self.engine.pause != "unpaused"

    @property
    def asleep(self) -> bool:
        return self.paused or bool(self.sleeping)

    def request_ended(self) -> None:
        """A request finished or was aborted: a waiting pause looks again."""
        self._ended.set()

    async def pause(self, mode: PauseMode, clear_cache: bool = True) -> None:
        if mode == "abort":
            self.clients.abort_all()
            self.gauges = None  # vLLM steps once more to publish the aborts
        self.engine.pause = "paused_all" if mode == "keep" else "paused_new"
        while mode == "wait" and self.engine.num_running:
            self._ended.clear()
            await self._ended.wait()
        if self.paused and self.gauges is None:
            self.gauges = (self.engine.num_running, self.engine.num_waiting)
        if clear_cache:
            self.engine.reset_prefix_cache(reset_running=True)
        await self.clients.flush()

    def resume(self) -> None:
        def unpause() -> None:
            self.engine.pause = "unpaused"

        self.gauges = None
        self.runner.update(unpause)

    async def sleep(self, level: int, mode: PauseMode) -> None:
        await self.pause(mode, clear_cache=level >= 1)
        self.sleep_state = (1, level)
        if level == 0:
            return
        if "weights" in self.sleeping:
            log.warning("sleep: the engine is already asleep")
            return
        self.sleeping |= SLEEP_TAGS
        self.weights.discarded |= level == 2

    def wake_up(self, tags: list[str] | None) -> bool:
        """Wake the tags given (all if None); resume once none sleeps. Returns whether fully awake."""
        if tags is not None and "scheduling" in tags:
            tags = [t for t in tags if t != "scheduling"]
        if tags is None or tags:
            self._wake_tags(tags)
        if self.sleeping:
            return False
        self.sleep_state = (0, 0)
        self.resume()
        return True

    def _wake_tags(self, tags: list[str] | None) -> None:
        if not self.sleeping:
            log.warning("wake_up: the engine is not asleep")
            return
        if tags and not set(tags) <= self.sleeping:
            log.warning("wake_up: tags %s are not all asleep (%s): nothing woken", tags, sorted(self.sleeping))
            return
        self.sleeping = self.sleeping - set(tags) if tags else set()

    async def reload(self, path: str | None) -> list[None]:
        """Reload the weights from `path`, or from where they last came from; raises WeightsError."""
        self.weights.source = path or self.weights.source
        if self.fail_reloads:
            raise WeightsError("injected fault: --fail-reloads")
        fingerprint = await asyncio.to_thread(read_weights, self.weights.source, self.weights.model)
        await self.runner.occupy(self.reload_s)
        self.weights.fingerprint, self.weights.discarded = fingerprint, False
        self.clients.switch_weights(self.weights.tag)
        return [None] * self.workers

    def reset_prefix_cache(self, reset_running: bool) -> bool:
        return self.engine.reset_prefix_cache(reset_running)
