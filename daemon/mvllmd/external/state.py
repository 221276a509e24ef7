"""An external server as mvllmd tracks it, what the API shows of it, and its state changes.

States (the instances' names): STARTING until its first check after a daemon start, READY, UNHEALTHY
(probes fail, or it makes no progress and a probe request goes unanswered: hung), and STOPPED once
detached. Every change is logged (never the key) and published to subscribers' queues.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mvllmd.broadcast import Broadcast
from mvllmd.external.spec import ExternalSpec
from mvllmd.instances.spec import InstanceState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExternalView:
    """What the API shows of an external server: never its API key, only whether it has one."""

    spec: ExternalSpec
    state: InstanceState
    since: datetime
    message: str
    has_api_key: bool


@dataclass(eq=False)
class ExternalServer:
    spec: ExternalSpec
    api_key: str
    state: InstanceState = InstanceState.STARTING
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    message: str = ""
    watch: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def view(self) -> ExternalView:
        return ExternalView(self.spec, self.state, self.since, self.message, bool(self.api_key))


class Changes(Broadcast[str]):
    """State changes: each logged, and published (the server's name) to every subscriber's queue."""

    def set_state(self, server: ExternalServer, state: InstanceState, message: str) -> None:
        """Note the message; on a change of state, log it and publish it."""
        old = server.state
        server.message = message
        if old is state:
            return
        server.state, server.since = state, datetime.now(UTC)
        level = logging.WARNING if state is InstanceState.UNHEALTHY else logging.INFO
        log.log(level, "external server %s: %s -> %s %s", server.name, old, state, message)
        self.publish(server)

    def publish(self, server: ExternalServer) -> None:
        self.send(server.name)
