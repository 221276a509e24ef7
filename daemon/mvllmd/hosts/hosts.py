"""This daemon's fleet of hosts, both ways round.

As a coordinator it links to every peer it was told of (link.py) and lists them with what each has.
As a peer it lets other daemons join it (`join`): only a caller whose client certificate is a fleet
host certificate (certs.identity), of the same fleet protocol, gets a token for its per-instance routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mvllm import __version__
from mvllmd.broadcast import Broadcast
from mvllmd.certs import identity
from mvllmd.errors import ConfigError, Conflict, Forbidden, InvalidRequest, MvllmError
from mvllmd.hosts.link import FLEET_PROTOCOL, Dial, Joined, PeerLink, Summary
from mvllmd.hosts.membership import HostEntry, Membership
from mvllmd.hosts.tokens import RouteTokens
from mvllmd.instances.placement import device_ref
from mvllmd.inventory import DeviceKind, Inventory

ASK_TIMEOUT_S = 5.0  # a peer that does not say what it has within this is listed as unreachable


@dataclass(frozen=True)
class HostView:
    name: str
    address: str  # empty for this host
    local: bool
    reachable: bool
    summary: Summary | None  # None: it did not answer
    message: str = ""
    source: str = ""


def host_summary(inventory: Inventory, holders: dict[str, str], instances: int) -> Summary:
    """This host's summary: its GPUs (real and simulated), those no instance holds, its instances."""
    gpus = [d for d in inventory.devices if d.kind in (DeviceKind.GPU, DeviceKind.SIM_GPU)]
    free = sum(1 for d in gpus if device_ref(d) not in holders)
    return Summary(__version__, len(gpus), free, instances)


class Hosts:
    def __init__(
        self, membership: Membership, dial: Dial, own: Callable[[], Awaitable[Summary]], refusal: str = ""
    ) -> None:
        """`refusal`: why this daemon cannot dial peers (it has no fleet certificate), or ""."""
        self.name = membership.own_name
        self._refusal = refusal
        if refusal and membership.entries():
            raise ConfigError(refusal)
        self.tokens = RouteTokens()
        self.http_urls: tuple[str, ...] = ()  # this daemon's HTTP listener, once bound (server.py)
        self._membership, self.dial, self._own = membership, dial, own
        self._links: dict[str, PeerLink] = {}
        self._changes: Broadcast[None] = Broadcast()

    def start(self) -> None:
        for entry in self._membership.entries():
            self._link(entry)

    async def close(self) -> None:
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()

    def links(self) -> list[PeerLink]:
        return [self._links[name] for name in sorted(self._links)]

    # --- as a coordinator ---------------------------------------------------------------------------

    async def list(self) -> list[HostView]:
        """This host, then every peer, each asked now (in parallel) what it has."""
        views = await asyncio.gather(self._view_self(), *(self._view(link) for link in self.links()))
        return list(views)

    async def add(self, name: str, address: str) -> HostView:
        if self._refusal:
            raise InvalidRequest(self._refusal)
        link = self._link(self._membership.add(name, address))
        await link.settled(ASK_TIMEOUT_S)  # so that the answer says whether it was reached
        return await self._view(link)

    async def remove(self, name: str) -> HostView:
        entry = self._membership.remove(name)
        link = self._links.pop(entry.name)
        view = await self._view(link)
        await link.close()
        self._notify()
        return view

    def subscribe(self) -> asyncio.Queue[None]:
        return self._changes.subscribe()

    def unsubscribe(self, queue: asyncio.Queue[None]) -> None:
        self._changes.unsubscribe(queue)

    def _link(self, entry: HostEntry) -> PeerLink:
        link = self._links[entry.name] = PeerLink(entry, self.dial, self._notify)
        link.start()
        return link

    def _notify(self) -> None:
        self._changes.send(None)

    async def _view_self(self) -> HostView:
        return HostView(self.name, "", local=True, reachable=True, summary=await self._own())

    async def _view(self, link: PeerLink) -> HostView:
        entry = link.entry
        summary, message = None, link.message
        if link.reachable:
            peer = self.dial(entry)
            try:
                async with asyncio.timeout(ASK_TIMEOUT_S):
                    summary = await peer.summary()
            except TimeoutError:
                message = f"no answer within {ASK_TIMEOUT_S:g} s"
            except MvllmError as exc:
                message = str(exc)
            finally:
                await peer.close()
        reachable = summary is not None
        return HostView(entry.name, entry.address, False, reachable, summary, message, str(entry.source))

    # --- as a peer ----------------------------------------------------------------------------------

    def join(self, client_cert: bytes | None, version: str, protocol: int) -> Joined:
        """Let the daemon whose client certificate is `client_cert` (PEM) join: its route token."""
        caller = identity(client_cert) if client_cert else None
        if caller is None or caller.kind != "host":
            raise Forbidden(
                "JoinFleet is for the fleet's daemons: call it with a host certificate of this fleet "
                "(mvllmd certs host NAME), over mutual TLS"
            )
        if protocol != FLEET_PROTOCOL:
            raise Conflict(
                f"{caller.name} runs mvllm {version or 'unknown'} (fleet protocol {protocol}) and {self.name} runs "
                f"mvllm {__version__} (fleet protocol {FLEET_PROTOCOL}): run one release on every host"
            )
        token = self.tokens.issue(caller.name)
        return Joined(self.name, __version__, FLEET_PROTOCOL, self.http_urls, token)
