"""The calls that name other fleet hosts (`--hosts`, HOST/NAME), relayed to those hosts' daemons over
mutual TLS (api/peers.py), as they came; their answers merged, each instance and device marked with
its host (`fleet_host`). A host that cannot do its part is reported (HostFailure), not fatal to the
others' answers. Each daemon does its own part; the relay only routes, and for a fleet launch asks
every host first and places the instances (hosts/placement.py) before anything starts.

Choosing hosts: no hosts means this one; ["all"] means this one and every peer; otherwise the names
given (this host's own name among them, if wanted).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc

from mvllm.v1 import fleet_pb2, instance_pb2_grpc, weights_pb2_grpc
from mvllm.v1 import instance_pb2 as pb
from mvllm.v1 import weights_pb2 as wpb
from mvllmd.api.peers import ANSWERED
from mvllmd.errors import InvalidRequest, MvllmError
from mvllmd.hosts.hosts import Hosts
from mvllmd.hosts.link import PeerLink
from mvllmd.hosts.placement import place

T = TypeVar("T")
Call = Callable[[str, Any], Awaitable[T]]  # given a peer's name and channel
RELAY_TIMEOUT_S = 30.0
LAUNCH_TIMEOUT_S = 3600.0  # a peer's launch waits for nothing but its engines' start


class Relay:
    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts

    @property
    def name(self) -> str:
        return self.hosts.name

    def chosen(self, names: Sequence[str]) -> tuple[bool, list[PeerLink]]:
        """Whether `names` choose this host, and which peers (module docstring)."""
        if not names:
            return True, []
        links = {link.entry.name: link for link in self.hosts.links()}
        if list(names) == ["all"]:
            return True, list(links.values())
        unknown = [n for n in names if n != self.name and n not in links]
        if unknown:
            fleet = ", ".join([self.name, *links])
            raise InvalidRequest(f"no host named {', '.join(unknown)} in the fleet ({fleet}); see mvllmctl hosts")
        return self.name in names, [links[n] for n in dict.fromkeys(names) if n in links]

    def peer(self, name: str) -> PeerLink:
        _, links = self.chosen([name])
        if not links:
            raise InvalidRequest(f"{name} is this host: name its instances without a host")
        return links[0]

    async def each(
        self, links: Sequence[PeerLink], call: Call[T], timeout_s: float = RELAY_TIMEOUT_S
    ) -> tuple[list[tuple[str, T]], list[fleet_pb2.HostFailure]]:
        """`call` on every peer at once: the answers by host, in order, and the hosts that failed."""
        outcomes = await asyncio.gather(*(self._one(link, call, timeout_s) for link in links))
        answers = [(link.entry.name, out) for link, out in zip(links, outcomes, strict=True)
                   if not isinstance(out, fleet_pb2.HostFailure)]  # fmt: skip
        return answers, [out for out in outcomes if isinstance(out, fleet_pb2.HostFailure)]

    async def stream(self, link: PeerLink, call: Callable[[Any], AsyncIterator[T]]) -> AsyncGenerator[T, None]:
        """A server-streamed call on one peer, its messages as they come."""
        peer = self.hosts.dial(link.entry)
        try:
            async for message in call(peer.channel):
                yield message
        except grpc.aio.AioRpcError as exc:
            raise peer.error(exc) from None
        finally:
            await peer.close()

    async def _one(self, link: PeerLink, call: Call[T], timeout_s: float) -> T | fleet_pb2.HostFailure:
        peer = self.hosts.dial(link.entry)
        try:
            async with asyncio.timeout(timeout_s):
                return await call(link.entry.name, peer.channel)
        except grpc.aio.AioRpcError as exc:
            said = exc.details() if exc.code() in ANSWERED else str(peer.error(exc))
            return fleet_pb2.HostFailure(host=link.entry.name, message=said or str(exc.code()))
        except TimeoutError:
            return fleet_pb2.HostFailure(host=link.entry.name, message=f"no answer within {timeout_s:g} s")
        finally:
            await peer.close()

    # --- a fleet launch -------------------------------------------------------------------------------

    async def launch(self, request: pb.LaunchInstancesRequest, here: Here) -> pb.LaunchInstancesResponse:
        """Check the launch on every chosen host, place it, start each host's part; nothing starts unless
        every check passed and the whole fits. `here` does this host's part."""
        if request.devices:
            raise InvalidRequest("--devices names one host's devices: give it without --hosts")
        mine, links = self.chosen(request.hosts)
        rooms = await self._rooms(request, here if mine else None, links)
        counts = place(rooms, request.count or 1, request.tensor_parallel_size or 1, request.spread)
        parts = {host: _part(request, count=n) for host, n in counts.items()}
        chosen = [link for link in links if link.entry.name in parts]

        async def launch_here() -> tuple[list[pb.Instance], list[fleet_pb2.HostFailure]]:
            if self.name not in counts:
                return [], []
            try:
                return marked(await here.launch(counts[self.name]), self.name), []
            except MvllmError as exc:
                return [], [fleet_pb2.HostFailure(host=self.name, message=str(exc))]

        async def launch_there(host: str, channel: Any) -> pb.LaunchInstancesResponse:
            launched: pb.LaunchInstancesResponse = await stub(channel).LaunchInstances(
                parts[host], timeout=LAUNCH_TIMEOUT_S
            )
            return launched

        (own, own_failures), (answers, failures) = await asyncio.gather(
            launch_here(), self.each(chosen, launch_there, LAUNCH_TIMEOUT_S)
        )
        response = pb.LaunchInstancesResponse(instances=own, failures=[*own_failures, *failures])
        for host, answer in answers:
            response.instances.extend(marked(answer.instances, host))
        return response

    async def _rooms(
        self, request: pb.LaunchInstancesRequest, here: Here | None, links: list[PeerLink]
    ) -> dict[str, int]:
        check = _part(request, count=request.count or 1, check_only=True)

        async def room(channel: Any) -> int:
            answer: pb.LaunchInstancesResponse = await stub(channel).LaunchInstances(check)
            return answer.room

        rooms: dict[str, int] = await self.checked(
            links, lambda _, ch: room(ch), here.room if here else None,
            "the launch was checked on every host first, and nothing was started",
        )  # fmt: skip
        return rooms

    async def checked(
        self, links: Sequence[PeerLink], call: Call[T], here: Callable[[], Awaitable[Any]] | None, refused: str
    ) -> dict[str, Any]:
        """Ask this host (`here`, first) and every peer (`call`) whether it can do its part; their answers by
        host, in order; InvalidRequest (`refused`, then what each failing host said) if any cannot."""
        answers, failures = await self.each(links, call)
        mine: dict[str, Any] = {}
        if here is not None:
            try:
                mine[self.name] = await here()
            except MvllmError as exc:
                failures.insert(0, fleet_pb2.HostFailure(host=self.name, message=str(exc)))
        if failures:
            raise InvalidRequest(f"{refused}: " + "; ".join(f"{f.host}: {f.message}" for f in failures))
        return {**mine, **dict(answers)}

    # --- weights across the fleet -----------------------------------------------------------------------

    async def update_weights(
        self, request: wpb.UpdateWeightsRequest, here: WeightsHere
    ) -> AsyncIterator[wpb.UpdateWeightsResponse]:
        """Check the update on every chosen host (nothing changes unless every check passes: the path
        there, instances of the model with weight updates, none busy), then update every host's instances
        at once, or one host after another with `rolling`; yield the merged report at each step."""
        mine, links = self.chosen(request.hosts)
        check, part = _weights_part(request, check_only=True), _weights_part(request)
        reports: dict[str, wpb.UpdateWeightsResponse] = await self.checked(
            links, lambda _, ch: _first(wstub(ch).UpdateWeights(check)), here.check if mine else None,
            "the update was checked on every host first, and nothing was changed",
        )  # fmt: skip

        def there(link: PeerLink) -> Callable[[], AsyncIterator[wpb.UpdateWeightsResponse]]:
            return lambda: self.stream(link, lambda ch: wstub(ch).UpdateWeights(part))

        streams: dict[str, Callable[[], AsyncIterator[wpb.UpdateWeightsResponse]]] = {}
        if mine:
            streams[self.name] = here.run
        streams.update((link.entry.name, there(link)) for link in links)
        async for merged in _merged(reports, streams, request.rolling):
            yield merged


class WeightsHere(Protocol):
    """This host's part of a fleet weight update (the servicer's, over WeightUpdates)."""

    async def check(self) -> wpb.UpdateWeightsResponse: ...

    def run(self) -> AsyncIterator[wpb.UpdateWeightsResponse]: ...


async def _merged(
    reports: dict[str, wpb.UpdateWeightsResponse],
    streams: dict[str, Callable[[], AsyncIterator[wpb.UpdateWeightsResponse]]],
    rolling: bool,
) -> AsyncIterator[wpb.UpdateWeightsResponse]:
    """Every host's latest report as one, after each message of any host; a host whose stream breaks
    is a failure, and ends."""
    news: asyncio.Queue[tuple[str, wpb.UpdateWeightsResponse | fleet_pb2.HostFailure]] = asyncio.Queue()
    ended: set[str] = set()

    async def follow(host: str) -> None:
        try:
            async for report in streams[host]():
                news.put_nowait((host, report))
        except MvllmError as exc:
            news.put_nowait((host, fleet_pb2.HostFailure(host=host, message=str(exc))))
        finally:
            ended.add(host)
            news.put_nowait((host, fleet_pb2.HostFailure()))  # a mark: this host's stream is over

    async def one_after_another() -> None:
        for host in streams:
            await follow(host)

    runs = [asyncio.create_task(one_after_another())] if rolling else [asyncio.create_task(follow(h)) for h in streams]
    failures: list[fleet_pb2.HostFailure] = []
    try:
        while len(ended) < len(streams) or not news.empty():
            host, news_item = await news.get()
            if isinstance(news_item, fleet_pb2.HostFailure):
                if news_item.host:
                    failures.append(news_item)
                continue
            reports[host] = news_item
            yield _merge(reports, failures, done=False)
        yield _merge(reports, failures, done=True)
    finally:
        for run in runs:
            run.cancel()


def _merge(
    reports: dict[str, wpb.UpdateWeightsResponse], failures: list[fleet_pb2.HostFailure], done: bool
) -> wpb.UpdateWeightsResponse:
    first = next(iter(reports.values()))
    merged = wpb.UpdateWeightsResponse(model=first.model, version=first.version, done=done, failures=failures,
                                       elapsed_seconds=max(r.elapsed_seconds for r in reports.values()))  # fmt: skip
    for host, report in reports.items():
        for instance in report.instances:
            entry = merged.instances.add()
            entry.CopyFrom(instance)
            entry.fleet_host = host
    return merged


async def _first(stream: AsyncIterator[T]) -> T:
    async for message in stream:
        return message
    raise InvalidRequest("a host ended the call without an answer")


def _weights_part(request: wpb.UpdateWeightsRequest, check_only: bool = False) -> wpb.UpdateWeightsRequest:
    part = wpb.UpdateWeightsRequest()
    part.CopyFrom(request)
    del part.hosts[:]
    part.check_only = check_only
    return part


def wstub(channel: Any) -> weights_pb2_grpc.WeightServiceStub:
    return weights_pb2_grpc.WeightServiceStub(channel)


class Here(Protocol):
    """This host's part of a fleet launch (the servicer's, over its InstanceManager)."""

    async def room(self) -> int: ...

    async def launch(self, count: int) -> list[pb.Instance]: ...


def _part(request: pb.LaunchInstancesRequest, *, count: int, check_only: bool = False) -> pb.LaunchInstancesRequest:
    """One host's part of a fleet launch: the request, for that host alone."""
    part = pb.LaunchInstancesRequest()
    part.CopyFrom(request)
    del part.hosts[:]
    part.spread = False
    part.count = count
    part.check_only = check_only
    return part


def stub(channel: Any) -> instance_pb2_grpc.InstanceServiceStub:
    return instance_pb2_grpc.InstanceServiceStub(channel)


def marked(instances: Sequence[pb.Instance], host: str) -> list[pb.Instance]:
    """Instances as a fleet listing shows them: with their host."""
    out = []
    for instance in instances:
        copy = pb.Instance()
        copy.CopyFrom(instance)
        copy.fleet_host = host
        out.append(copy)
    return out
