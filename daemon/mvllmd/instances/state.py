"""An instance as mvllmd tracks it, what the API shows of it, and its state changes.

States: STARTING until /health answers 200 and /v1/models lists the model; READY; UNHEALTHY when
probes fail or the engine makes no progress; RESTARTING after its process exited; FAILED when it will
not come back; STOPPED once stopped (and then it is forgotten). Every state change is logged and
published as an InstanceEvent to subscribers (the job dispatcher).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mvllmd.broadcast import Broadcast
from mvllmd.instances.spec import InstanceSpec, InstanceState
from mvllmd.weights.state import Weights

log = logging.getLogger(__name__)

LIVE = (InstanceState.STARTING, InstanceState.READY, InstanceState.UNHEALTHY, InstanceState.RESTARTING)


@dataclass(frozen=True)
class InstanceView:
    """What the API shows of an instance (never its API key or environment)."""

    spec: InstanceSpec
    state: InstanceState
    since: datetime
    pid: int
    restarts: int
    message: str
    unit: str
    ready_after_s: float
    sleep_level: int = 0


@dataclass(frozen=True)
class InstanceEvent:
    name: str
    old: InstanceState | None
    new: InstanceState
    view: InstanceView


@dataclass(eq=False)
class Instance:
    """One instance and what its monitor has learnt of it."""

    spec: InstanceSpec
    api_key: str
    unit: str  # the backend's name for it ("" where it has none)
    state: InstanceState = InstanceState.STARTING
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    message: str = ""
    pid: int = 0
    restarts: list[float] = field(default_factory=list)
    ever_ready: bool = False
    ready_after_s: float = 0.0
    started: float = field(default_factory=time.monotonic)  # launch, for ready_after_s
    started_round: float = field(default_factory=time.monotonic)  # this (re)start, for the start deadline
    monitor: asyncio.Task[None] | None = None
    weights: Weights = field(default_factory=Weights)

    def __post_init__(self) -> None:
        self.weights.version = self.spec.weight_version

    @property
    def name(self) -> str:
        return self.spec.name

    def view(self) -> InstanceView:
        return InstanceView(
            spec=self.spec,
            state=self.state,
            since=self.since,
            pid=self.pid,
            restarts=len(self.restarts),
            message=self.message,
            unit=self.unit,
            ready_after_s=self.ready_after_s,
            sleep_level=self.weights.sleep_level,
        )


class Events(Broadcast[InstanceEvent]):
    """State changes: each logged, and published to every subscriber's queue."""

    def set_state(self, inst: Instance, state: InstanceState, message: str) -> None:
        """Note the message; on a change of state, log it and publish it."""
        old = inst.state
        inst.message = message
        if old is state:
            return
        inst.state, inst.since = state, datetime.now(UTC)
        level = logging.WARNING if state in (InstanceState.FAILED, InstanceState.UNHEALTHY) else logging.INFO
        # Not the engine's log lines: an engine may log requests, and prompts stay out of mvllmd's log.
        log.log(level, "instance %s: %s -> %s %s", inst.name, old, state, message.split("; log:", maxsplit=1)[0])
        self.publish(inst, old)

    def publish(self, inst: Instance, old: InstanceState | None) -> None:
        self.send(InstanceEvent(inst.name, old, inst.state, inst.view()))
