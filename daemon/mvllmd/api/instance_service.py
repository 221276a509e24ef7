"""InstanceService: translates launches, stops, listings, log streams, and the attaching and detaching of
external servers between protos and the domain."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from mvllm.v1 import instance_pb2 as pb
from mvllm.v1 import instance_pb2_grpc
from mvllmd.api.boundary import rpc, rpc_stream
from mvllmd.api.relay import Relay, marked
from mvllmd.api.relay import stub as relay_stub
from mvllmd.errors import InvalidRequest
from mvllmd.external.servers import AttachRequest, ExternalServers
from mvllmd.external.state import ExternalView
from mvllmd.instances.manager import InstanceManager
from mvllmd.instances.request import LaunchRequest
from mvllmd.instances.spec import EngineKind, InstanceState
from mvllmd.instances.state import InstanceView

STATES = {
    InstanceState.STARTING: pb.INSTANCE_STATE_STARTING,
    InstanceState.READY: pb.INSTANCE_STATE_READY,
    InstanceState.UNHEALTHY: pb.INSTANCE_STATE_UNHEALTHY,
    InstanceState.RESTARTING: pb.INSTANCE_STATE_RESTARTING,
    InstanceState.FAILED: pb.INSTANCE_STATE_FAILED,
    InstanceState.STOPPED: pb.INSTANCE_STATE_STOPPED,
}
ENGINES = {EngineKind.VLLM: pb.ENGINE_KIND_VLLM, EngineKind.SIM: pb.ENGINE_KIND_SIM}
ENGINES_BY_PROTO = {v: k for k, v in ENGINES.items()}
DEFAULT_LOG_LINES = 200
LIST_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 300.0  # a peer's engines get their grace to finish


class InstanceServicer(instance_pb2_grpc.InstanceServiceServicer):  # type: ignore[misc]  # untyped stub base
    """This host's instances; those of other fleet hosts through `relay` (--hosts, HOST/NAME)."""

    def __init__(self, instances: InstanceManager, external: ExternalServers, relay: Relay | None = None) -> None:
        self._instances = instances
        self._external = external
        self._relay = relay
        self._here = relay.name if relay is not None else ""

    @rpc
    async def LaunchInstances(self, request: pb.LaunchInstancesRequest, context: Any) -> pb.LaunchInstancesResponse:
        if request.check_only:
            return pb.LaunchInstancesResponse(room=await self._instances.room(launch_from_proto(request)))
        if request.hosts:
            return await self._fleet().launch(request, _Here(self, request))
        views = await self._instances.launch(launch_from_proto(request))
        return pb.LaunchInstancesResponse(instances=self._protos(views))

    @rpc
    async def StopInstances(self, request: pb.StopInstancesRequest, context: Any) -> pb.StopInstancesResponse:
        here, elsewhere = self._split(request.names)
        every = request.all and bool(request.hosts)
        mine, links = self._fleet().chosen(request.hosts) if every else (request.all or bool(here), [])
        named = {link.entry.name for link in links}
        links += [self._fleet().peer(host) for host in elsewhere if host not in named]

        def stop_there(host: str, channel: Any) -> Any:
            part = pb.StopInstancesRequest(names=elsewhere.get(host, []), all=request.all, force=request.force)
            return relay_stub(channel).StopInstances(part, timeout=STOP_TIMEOUT_S)

        response = pb.StopInstancesResponse()
        if mine:
            response.instances.extend(self._protos(await self._instances.stop(here, request.all, request.force)))
        if links:
            answers, failures = await self._fleet().each(links, stop_there, STOP_TIMEOUT_S)
            response.failures.extend(failures)
            for host, answer in answers:
                response.instances.extend(marked(answer.instances, host))
        return response

    @rpc
    async def ListInstances(self, request: pb.ListInstancesRequest, context: Any) -> pb.ListInstancesResponse:
        mine, links = self._fleet().chosen(request.hosts) if request.hosts else (True, [])
        response = pb.ListInstancesResponse()
        if mine:
            response.instances.extend(self._protos(self._instances.list_instances()))
            response.external_servers.extend(external_to_proto(v) for v in self._external.list_servers())
        if links:
            answers, failures = await self._fleet().each(
                links, lambda _, ch: relay_stub(ch).ListInstances(pb.ListInstancesRequest(), timeout=LIST_TIMEOUT_S)
            )
            response.failures.extend(failures)
            for host, answer in answers:
                response.instances.extend(marked(answer.instances, host))
        return response

    @rpc
    async def AttachServer(self, request: pb.AttachServerRequest, context: Any) -> pb.AttachServerResponse:
        attach = AttachRequest(request.url, request.model, request.name, request.api_key, request.max_num_seqs)
        return pb.AttachServerResponse(server=external_to_proto(await self._external.attach(attach)))

    @rpc
    async def DetachServer(self, request: pb.DetachServerRequest, context: Any) -> pb.DetachServerResponse:
        return pb.DetachServerResponse(server=external_to_proto(await self._external.detach(request.name)))

    @rpc_stream
    async def WatchInstances(
        self, request: pb.WatchInstancesRequest, context: Any
    ) -> AsyncIterator[pb.WatchInstancesResponse]:
        async for views, changed in self._instances.watch():
            yield pb.WatchInstancesResponse(instances=self._protos(views), changed=changed)

    @rpc_stream
    async def GetInstanceLogs(
        self, request: pb.GetInstanceLogsRequest, context: Any
    ) -> AsyncIterator[pb.GetInstanceLogsResponse]:
        host, _, name = request.name.rpartition("/")
        if host and host != self._here:
            there = pb.GetInstanceLogsRequest(name=name, follow=request.follow, tail_lines=request.tail_lines)
            async for message in self._fleet().stream(
                self._fleet().peer(host), lambda ch: relay_stub(ch).GetInstanceLogs(there)
            ):
                yield message
            return
        tail = request.tail_lines or DEFAULT_LOG_LINES
        async for lines in self._instances.logs(name, request.follow, tail):
            yield pb.GetInstanceLogsResponse(lines=lines)

    def _fleet(self) -> Relay:
        if self._relay is None:
            raise InvalidRequest("this daemon has no fleet of hosts")
        return self._relay

    def _protos(self, views: list[InstanceView]) -> list[pb.Instance]:
        protos = [instance_to_proto(v) for v in views]
        for proto in protos:
            proto.fleet_host = self._here
        return protos

    def _split(self, names: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
        """Names of this host's instances (NAME, or THIS_HOST/NAME), and those of other hosts, by host."""
        here: list[str] = []
        elsewhere: dict[str, list[str]] = {}
        for full in names:
            host, _, name = full.rpartition("/")
            if host and host != self._here:
                elsewhere.setdefault(host, []).append(name)
            else:
                here.append(name)
        return here, elsewhere


class _Here:
    """This host's part of a fleet launch (api/relay.py)."""

    def __init__(self, servicer: InstanceServicer, request: pb.LaunchInstancesRequest) -> None:
        self._servicer, self._request = servicer, launch_from_proto(request)

    async def room(self) -> int:
        return await self._servicer._instances.room(self._request)

    async def launch(self, count: int) -> list[pb.Instance]:
        views = await self._servicer._instances.launch(replace(self._request, count=count))
        return self._servicer._protos(views)


def launch_from_proto(request: pb.LaunchInstancesRequest) -> LaunchRequest:
    if request.engine not in ENGINES_BY_PROTO and request.engine != pb.ENGINE_KIND_UNSPECIFIED:
        raise InvalidRequest(f"unknown engine {request.engine}")
    return LaunchRequest(
        model=request.model,
        count=request.count or 1,
        tensor_parallel_size=request.tensor_parallel_size or 1,
        engine=ENGINES_BY_PROTO.get(request.engine, EngineKind.VLLM),
        devices=request.devices,
        port_base=request.port_base or None,
        host=request.host or "127.0.0.1",
        env=dict(request.env),
        engine_args=tuple(request.engine_args),
        name_prefix=request.name_prefix,
        api_key=request.api_key,
        force=request.force,
        cpu=request.cpu,
        max_num_seqs=request.max_num_seqs,
        weight_updates=request.weight_updates if request.HasField("weight_updates") else None,
    )


def instance_to_proto(view: InstanceView) -> pb.Instance:
    since = Timestamp()
    since.FromDatetime(view.since)
    spec = view.spec
    return pb.Instance(
        name=spec.name,
        state=STATES[view.state],
        url=spec.url,
        model=spec.served_model_name,
        engine=ENGINES[spec.engine],
        devices=list(spec.devices),
        port=spec.port,
        host=spec.host,
        tensor_parallel_size=spec.tensor_parallel_size,
        pid=view.pid,
        max_num_seqs=spec.max_num_seqs,
        restarts=view.restarts,
        message=view.message,
        unit=view.unit,
        state_since=since,
        ready_after_seconds=view.ready_after_s,
        weight_updates=spec.weight_updates,
        weight_version=spec.weight_version,
        weights_path=spec.weights_path,
        sleep_level=view.sleep_level,
        trial=spec.trial,
    )


def external_to_proto(view: ExternalView) -> pb.ExternalServer:
    since, attached = Timestamp(), Timestamp()
    since.FromDatetime(view.since)
    attached.FromSeconds(int(view.spec.attached_at))
    return pb.ExternalServer(
        name=view.spec.name,
        state=STATES[view.state],
        url=view.spec.url,
        model=view.spec.model,
        has_api_key=view.has_api_key,
        max_num_seqs=view.spec.max_num_seqs,
        message=view.message,
        state_since=since,
        attached_at=attached,
    )
