"""The client side of the fleet: this daemon's gRPC calls to a peer daemon, over mutual TLS with its own
host certificate (--tls-cert, --tls-key), trusting the fleet CA (--tls-client-ca) for the peer's. Like
the servicers, it only translates: protos to the domain's types (hosts/link.py), gRPC errors to
mvllmd's (errors.py).

The channel sends keepalive pings every KEEPALIVE_S and gives the peer KEEPALIVE_TIMEOUT_S to answer: a
peer whose network is cut is known lost within seconds, not at TCP's minutes. (Its server accepts
such pings: server.py.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from mvllm import __version__
from mvllm.v1 import daemon_pb2, daemon_pb2_grpc, fleet_pb2, fleet_pb2_grpc, instance_pb2, instance_pb2_grpc
from mvllmd.certs import split_address
from mvllmd.errors import (
    ConfigError,
    Conflict,
    Forbidden,
    InvalidRequest,
    MvllmError,
    NotFound,
    ResourceExhausted,
    Unreachable,
)
from mvllmd.hosts.link import FLEET_PROTOCOL, Joined, RemoteInstance, Summary
from mvllmd.hosts.membership import HostEntry
from mvllmd.instances.spec import InstanceState
from mvllmd.tls import TlsFiles

CALL_TIMEOUT_S = 10.0
KEEPALIVE_S = 2.0
KEEPALIVE_TIMEOUT_S = 3.0
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
    ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect soon after a peer comes back (gRPC's own backoff grows to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
)
GPU_KINDS = (daemon_pb2.DEVICE_KIND_GPU, daemon_pb2.DEVICE_KIND_SIM_GPU)
# Codes by which a peer's daemon answered, in words of its own (the rest are about reaching it).
ANSWERED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                      grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      grpc.StatusCode.PERMISSION_DENIED})  # fmt: skip
# Of those, the ones raised as this daemon's own errors, in the peer's words (so that, say, a model that
# fits on no host's GPUs stays exit 4).
ANSWERS: dict[grpc.StatusCode, type[MvllmError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


def fleet_credentials(tls: TlsFiles | None) -> Any:
    """This daemon's client credentials toward its peers; ConfigError without a fleet certificate."""
    if tls is None or tls.client_ca is None:
        raise ConfigError(
            "peers need this daemon's fleet certificate: start it with --tls-cert and --tls-key (mvllmd certs host "
            "NAME) and --tls-client-ca (the fleet's ca.pem)"
        )
    try:
        root, key, chain = tls.client_ca.read_bytes(), tls.key.read_bytes(), tls.cert.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)


class PeerClient:
    """One channel to one peer (hosts/link.py's Peer)."""

    def __init__(self, entry: HostEntry, credentials: Any) -> None:
        self._entry = entry
        self._channel = grpc.aio.secure_channel(entry.address, credentials, options=CHANNEL_OPTIONS)

    @property
    def channel(self) -> Any:
        """The gRPC channel, for calls relayed as they came (api/relay.py)."""
        return self._channel

    async def join(self) -> Joined:
        stub = fleet_pb2_grpc.FleetServiceStub(self._channel)
        request = fleet_pb2.JoinFleetRequest(version=__version__, protocol=FLEET_PROTOCOL)
        try:
            r = await stub.JoinFleet(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None
        return Joined(r.name, r.version, r.protocol, tuple(r.http_urls), r.route_token)

    async def watch(self) -> AsyncIterator[list[RemoteInstance]]:
        stub = instance_pb2_grpc.InstanceServiceStub(self._channel)
        try:
            async for r in stub.WatchInstances(instance_pb2.WatchInstancesRequest()):
                yield [remote_instance(i) for i in r.instances]
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None

    async def summary(self) -> Summary:
        daemon = daemon_pb2_grpc.DaemonServiceStub(self._channel)
        instances = instance_pb2_grpc.InstanceServiceStub(self._channel)
        try:
            info = await daemon.GetDaemonInfo(daemon_pb2.GetDaemonInfoRequest(), timeout=CALL_TIMEOUT_S)
            devices = await daemon.ListDevices(daemon_pb2.ListDevicesRequest(), timeout=CALL_TIMEOUT_S)
            listed = await instances.ListInstances(instance_pb2.ListInstancesRequest(), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None
        gpus = [d for d in devices.devices if d.kind in GPU_KINDS]
        free = sum(1 for d in gpus if not d.instance)
        return Summary(info.version, len(gpus), free, len(listed.instances))

    async def close(self) -> None:
        await self._channel.close()

    def error(self, exc: Exception) -> MvllmError:
        where = f"host {self._entry.name} at {self._entry.address}"
        if not isinstance(exc, grpc.aio.AioRpcError):
            return Unreachable(f"{where}: {exc}")
        details = exc.details() or str(exc.code())
        code = exc.code()
        if code is grpc.StatusCode.PERMISSION_DENIED:
            return Forbidden(f"{where} refused: {details}")
        if code is grpc.StatusCode.FAILED_PRECONDITION:
            return Conflict(f"{where}: {details}")
        if code in ANSWERS:  # the peer's daemon answered, in words of its own (the caller names the host)
            return ANSWERS[code](details)
        return Unreachable(f"{where}: {tls_refusal(details, self._entry) or details}")


def tls_refusal(details: str, entry: HostEntry) -> str:
    """What to check, when gRPC's `details` say that the TLS handshake with the peer failed; else ""."""
    lower = details.lower()
    if "hostname verification" in lower or "is not in peer certificate" in lower:
        return (
            f"its certificate does not name {split_address(entry.address)[0]}, the address dialled: make it with "
            f"mvllmd certs host {entry.name} --address {entry.address} (or dial an address it names)"
        )
    if "failed to connect" in lower and ("socket closed" in lower or "connection reset" in lower):
        # TLS 1.3: the peer checks this daemon's certificate after the handshake ends here, and hangs up.
        return (
            "it closed the connection at the TLS handshake, as a peer does with a certificate it does not accept: "
            "this daemon's --tls-cert must be signed by the fleet CA (the peer's --tls-client-ca) and be in date"
        )
    if any(word in lower for word in ("ssl", "handshake", "certificate")):
        return (
            f"the TLS handshake failed ({_last_reason(details)}): its certificate must be a host certificate "
            "(mvllmd certs host) of the fleet CA (this daemon's --tls-client-ca), in date, naming the address dialled"
        )
    return ""


def _last_reason(details: str) -> str:
    """The reason at the end of gRPC's "failed to connect to all addresses; last error: ...: REASON: OK"."""
    return details.removesuffix(": OK").rsplit(": ", 1)[-1].strip() or details


def remote_instance(i: instance_pb2.Instance) -> RemoteInstance:
    try:  # INSTANCE_STATE_READY -> InstanceState.READY
        state = InstanceState(instance_pb2.InstanceState.Name(i.state).removeprefix("INSTANCE_STATE_").lower())
    except ValueError:
        raise Unreachable(f"a peer sent instance {i.name} in an unknown state ({i.state})") from None
    return RemoteInstance(i.name, state, i.model, i.weights_path, i.max_num_seqs, i.trial)
