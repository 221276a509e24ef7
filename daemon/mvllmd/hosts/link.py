"""The coordinator's side of one peer: join it (a route token and its HTTP listener), then watch its
instances, and start again after any failure, with backoff.

While the watch runs, the peer's READY instances are servers of this daemon's fleet (fleet.py), reached
through the peer's per-instance route. When it breaks (the peer's mvllmd killed, its network cut: the
channel's keepalive notices within seconds), the peer is unreachable and its instances leave the fleet
at once, so running jobs send their requests elsewhere; when it answers again, they come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mvllmd.addresses import TcpAddress, parse_address
from mvllmd.errors import Conflict, MvllmError, Unreachable
from mvllmd.hosts.membership import HostEntry
from mvllmd.instances.spec import InstanceState

log = logging.getLogger(__name__)

FLEET_PROTOCOL = 1  # daemons of different protocols refuse each other (JoinFleet)
RETRY_MIN_S = 0.5
RETRY_MAX_S = 5.0
WILDCARDS = frozenset({"0.0.0.0", "::"})  # noqa: S104  # listener addresses, read (nothing binds them here)


@dataclass(frozen=True)
class RemoteInstance:
    name: str
    state: InstanceState
    model: str  # the served model name
    weights_path: str  # what it was launched with, or last updated to (a job may name the model so)
    max_num_seqs: int
    trial: bool = False  # a tune trial's: it takes no work from coordinators


@dataclass(frozen=True)
class Joined:
    """A peer's answer to JoinFleet."""

    name: str
    version: str
    protocol: int
    http_urls: tuple[str, ...]
    token: str


@dataclass(frozen=True)
class Summary:
    """What `mvllmctl hosts` shows of a host."""

    version: str
    gpus_total: int
    gpus_free: int
    instances: int


class Peer(Protocol):
    """A connection to one peer daemon (api/peers.py); its calls raise MvllmError."""

    @property
    def channel(self) -> Any:
        """The connection itself, for calls relayed as they came (api/relay.py)."""

    def error(self, exc: Exception) -> MvllmError:
        """A failed relayed call as the error a user reads."""

    async def join(self) -> Joined: ...

    def watch(self) -> AsyncIterator[list[RemoteInstance]]: ...

    async def summary(self) -> Summary: ...

    async def close(self) -> None: ...


Dial = Callable[[HostEntry], Peer]


class PeerLink:
    def __init__(self, entry: HostEntry, dial: Dial, changed: Callable[[], None]) -> None:
        self.entry = entry
        self._dial, self._changed = dial, changed
        self.reachable = False
        self.message = "not reached yet"
        self.version = ""
        self.url = ""  # the peer's HTTP listener, as this daemon reaches it
        self.token = ""  # for its per-instance routes
        self.instances: tuple[RemoteInstance, ...] = ()
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()  # its first dial ended, one way or the other

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"peer {self.entry.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def settled(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until the first dial has ended, reached or not."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._first.wait()

    def route(self, instance: str) -> str:
        """The base URL of one of the peer's instances, through its per-instance route."""
        return f"{self.url}/i/{instance}"

    async def _run(self) -> None:
        delay = RETRY_MIN_S
        while True:
            peer = self._dial(self.entry)
            try:
                await self._joined(await peer.join())
                async for instances in peer.watch():
                    self._seen(tuple(instances))
                    delay = RETRY_MIN_S
                raise Unreachable("its daemon stopped")
            except MvllmError as exc:
                self._lost(str(exc))
            finally:
                await peer.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _joined(self, joined: Joined) -> None:
        name = self.entry.name
        if joined.name != name:
            raise Conflict(f"the daemon at {self.entry.address} is {joined.name}, not {name}")
        self.url = reachable_url(joined.http_urls, self.entry.address, name)
        self.version, self.token = joined.version, joined.token

    def _seen(self, instances: tuple[RemoteInstance, ...]) -> None:
        if not self.reachable:
            log.info("peer %s at %s: reachable (mvllm %s)", self.entry.name, self.entry.address, self.version)
        self.reachable, self.message, self.instances = True, "", instances
        self._first.set()
        self._changed()

    def _lost(self, why: str) -> None:
        if self.reachable or why != self.message:
            log.warning("peer %s at %s: unreachable: %s", self.entry.name, self.entry.address, why)
        was = self.reachable or bool(self.instances)
        self.reachable, self.message, self.instances = False, why, ()
        self._first.set()
        if was:
            self._changed()


def reachable_url(urls: tuple[str, ...], address: str, name: str) -> str:
    """Of a peer's HTTP listener URLs, the one this daemon can reach: on the host of its gRPC address, or
    on a wildcard address (0.0.0.0, ::) taken as that host."""
    tcp = parse_address(address)
    assert isinstance(tcp, TcpAddress)  # membership checks it
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname == tcp.host:
            return url
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname in WILDCARDS:
            return f"{parts.scheme}://{_bracketed(tcp.host)}:{parts.port}"
    listed = ", ".join(urls) or "none (started with --http-listen none)"
    raise Conflict(
        f"host {name}'s HTTP listener ({listed}) is not on {tcp.host}, where it is dialled: start its mvllmd "
        f"with --http-listen https://{_bracketed(tcp.host)}:7080"
    )


def _bracketed(host: str) -> str:
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    return host
