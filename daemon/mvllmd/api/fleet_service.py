"""FleetService: translates host listings, membership changes and daemons joining between protos and the
domain (hosts/)."""

from __future__ import annotations

from typing import Any

from mvllm.v1 import fleet_pb2 as pb
from mvllm.v1 import fleet_pb2_grpc
from mvllmd.api.boundary import rpc
from mvllmd.hosts.hosts import Hosts, HostView

PEM_KEY = "x509_pem_cert"  # gRPC's auth context: the client certificate the TLS layer accepted


class FleetServicer(fleet_pb2_grpc.FleetServiceServicer):  # type: ignore[misc]  # untyped stub base
    def __init__(self, hosts: Hosts) -> None:
        self._hosts = hosts

    @rpc
    async def ListHosts(self, request: pb.ListHostsRequest, context: Any) -> pb.ListHostsResponse:
        return pb.ListHostsResponse(hosts=[host_to_proto(v) for v in await self._hosts.list()])

    @rpc
    async def AddHost(self, request: pb.AddHostRequest, context: Any) -> pb.AddHostResponse:
        return pb.AddHostResponse(host=host_to_proto(await self._hosts.add(request.name, request.address)))

    @rpc
    async def RemoveHost(self, request: pb.RemoveHostRequest, context: Any) -> pb.RemoveHostResponse:
        return pb.RemoveHostResponse(host=host_to_proto(await self._hosts.remove(request.name)))

    @rpc
    async def JoinFleet(self, request: pb.JoinFleetRequest, context: Any) -> pb.JoinFleetResponse:
        pems = context.auth_context().get(PEM_KEY) or [None]
        joined = self._hosts.join(pems[0], request.version, request.protocol)
        return pb.JoinFleetResponse(name=joined.name, version=joined.version, protocol=joined.protocol,
                                    http_urls=list(joined.http_urls), route_token=joined.token)  # fmt: skip


def host_to_proto(view: HostView) -> pb.Host:
    summary = view.summary
    return pb.Host(
        name=view.name,
        address=view.address,
        local=view.local,
        reachable=view.reachable,
        version=summary.version if summary else "",
        gpus_total=summary.gpus_total if summary else 0,
        gpus_free=summary.gpus_free if summary else 0,
        instances=summary.instances if summary else 0,
        message=view.message,
        source=view.source,
    )
