"""The gRPC boundary in-process: translation, the error table, health and reflection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from mvllm import __version__
from mvllm.jobs import InvalidSpec
from mvllm.v1 import daemon_pb2 as pb
from mvllm.v1 import daemon_pb2_grpc, instance_pb2, tune_pb2, tune_pb2_grpc
from mvllmd import errors
from mvllmd.api.boundary import rpc
from mvllmd.config import load_config
from mvllmd.daemon import Daemon
from mvllmd.dispatch.endpoints import Endpoints, Tuning
from mvllmd.external.servers import ExternalServers
from mvllmd.external.store import ExternalStore
from mvllmd.fleet import Fleet
from mvllmd.instances.backends.choice import BackendKind
from mvllmd.instances.backends.process import ProcessBackend
from mvllmd.instances.manager import InstanceManager
from mvllmd.inventory import Inventory, read_inventory
from mvllmd.jobs.manager import JobManager
from mvllmd.jobs.store import JobStore
from mvllmd.server import SERVER_OPTIONS, _add_services
from mvllmd.tune.sweep import Tuner
from mvllmd.weights.updates import WeightUpdates


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[str]:
    """The daemon's real services on an in-process server, on a unix socket in tmp_path."""
    config = load_config(
        None,
        {"daemon.listen": [f"unix:{tmp_path}/s"], "inventory.cpu_slots": 1, "inventory.sim_gpus": 2},
        {"HOME": str(tmp_path)},
        euid=1000,
    )

    async def inventory() -> Inventory:
        return read_inventory("none", 1, 2)

    instances = InstanceManager(config, ProcessBackend(config.daemon.state_dir), inventory)
    config.daemon.state_dir.mkdir(parents=True)
    external = ExternalServers(ExternalStore(config.daemon.state_dir), config.instances, 256)
    fleet = Fleet(instances, external)
    endpoints = Endpoints(Tuning.of(config.jobs), weights_of=instances.weights_of)
    jobs = JobManager(JobStore(config.daemon.state_dir / "jobs.sqlite3"), fleet, config.jobs, endpoints=endpoints)
    daemon = Daemon(
        config=config, unit_manager=BackendKind.PROCESS, under_systemd=False, instances=instances, jobs=jobs,
        fleet=fleet, endpoints=endpoints, weights=WeightUpdates(instances, endpoints),
        tuner=Tuner(instances, inventory, config),
    )  # fmt: skip
    daemon.listen_addresses = (f"unix:{tmp_path}/s",)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    health = _add_services(server, daemon)
    server.add_insecure_port(f"unix:{tmp_path}/s")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    yield f"unix:{tmp_path}/s"
    await server.stop(0)
    await jobs.close()


async def test_get_daemon_info(served: str) -> None:
    async with grpc.aio.insecure_channel(served) as channel:
        stub = daemon_pb2_grpc.DaemonServiceStub(channel)
        call = stub.GetDaemonInfo(pb.GetDaemonInfoRequest())
        info = await call
        metadata = dict(await call.initial_metadata())
    assert info.version == __version__
    assert metadata["mvllm-version"] == __version__
    assert info.unit_manager == pb.UNIT_MANAGER_PROCESS
    assert list(info.listen_addresses) == [served]
    assert info.uptime_seconds >= 0
    assert info.start_time.seconds > 0


async def test_list_devices_filters_by_kind(served: str) -> None:
    async with grpc.aio.insecure_channel(served) as channel:
        stub = daemon_pb2_grpc.DaemonServiceStub(channel)
        everything = await stub.ListDevices(pb.ListDevicesRequest())
        sims = await stub.ListDevices(pb.ListDevicesRequest(kind=pb.DEVICE_KIND_SIM_GPU))
    assert [d.kind for d in everything.devices] == [pb.DEVICE_KIND_CPU_SLOT] + [pb.DEVICE_KIND_SIM_GPU] * 2
    assert [d.uuid for d in sims.devices] == ["sim-gpu-0", "sim-gpu-1"]
    assert everything.gpu_source == pb.GPU_SOURCE_NONE


async def test_health(served: str) -> None:
    async with grpc.aio.insecure_channel(served) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(served: str) -> None:
    # A generic client: it knows no mvllm stubs and learns everything from the server. It blocks,
    # so it runs in a thread while the event loop serves.
    def ask(address: str) -> tuple[set[str], set[str]]:
        with grpc.insecure_channel(address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            pool = descriptor_pool.DescriptorPool(database)
            service = pool.FindServiceByName("mvllm.v1.DaemonService")
            return set(database.get_services()), {m.name for m in service.methods}

    services, methods = await asyncio.to_thread(ask, served)
    assert {
        "mvllm.v1.DaemonService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    assert methods == {"GetDaemonInfo", "ListDevices", "GetOverview"}


async def test_get_overview_of_an_idle_daemon(served: str) -> None:
    async with grpc.aio.insecure_channel(served) as channel:
        overview = await daemon_pb2_grpc.DaemonServiceStub(channel).GetOverview(pb.GetOverviewRequest())
    sims = [g for g in overview.gpus if g.kind == pb.DEVICE_KIND_SIM_GPU]  # (a GPU host adds its real ones)
    assert [(g.uuid, g.utilization, g.memory_used_bytes, g.memory_total_bytes) for g in sims] == [
        ("sim-gpu-0", 0.0, 0, 80 * 2**30),
        ("sim-gpu-1", 0.0, 0, 80 * 2**30),
    ]
    assert (list(overview.servers), list(overview.jobs)) == ([], [])
    assert overview.front_door == pb.OverviewFrontDoor()  # off (this daemon has none), nothing counted
    assert overview.version == __version__ and overview.uptime_seconds >= 0


class Faulty(daemon_pb2_grpc.DaemonServiceServicer):  # type: ignore[misc]
    """A servicer whose method raises what it is told to, to exercise the boundary's error table."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    @rpc
    async def GetDaemonInfo(self, request: Any, context: Any) -> pb.GetDaemonInfoResponse:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "code", "details"),
    [
        (
            errors.ResourceExhausted("only 2 GPUs free"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "only 2 GPUs free",
        ),
        (errors.NotFound("no instance x"), grpc.StatusCode.NOT_FOUND, "no instance x"),
        (errors.InvalidRequest("n must be >= 1"), grpc.StatusCode.INVALID_ARGUMENT, "n must be >= 1"),
        (InvalidSpec("--top-p must be above 0"), grpc.StatusCode.INVALID_ARGUMENT, "--top-p must be above 0"),
        (errors.Conflict("already running"), grpc.StatusCode.FAILED_PRECONDITION, "already running"),
        (
            KeyError("secret-prompt-text"),
            grpc.StatusCode.INTERNAL,
            "internal error in mvllmd; its log has the details",
        ),
    ],
)
async def test_error_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, exc: BaseException, code: grpc.StatusCode, details: str
) -> None:
    server = grpc.aio.server()
    daemon_pb2_grpc.add_DaemonServiceServicer_to_server(Faulty(exc), server)
    server.add_insecure_port(f"unix:{tmp_path}/f")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{tmp_path}/f") as channel:
            with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await daemon_pb2_grpc.DaemonServiceStub(channel).GetDaemonInfo(pb.GetDaemonInfoRequest())
    finally:
        await server.stop(0)
    assert excinfo.value.code() == code
    assert excinfo.value.details() == details  # nothing more: an internal error leaks nothing
    if code is grpc.StatusCode.INTERNAL:
        assert "Traceback" in caplog.text  # the details go to the daemon's log instead


def test_every_domain_error_has_a_status() -> None:
    from mvllmd.api.boundary import STATUS_BY_ERROR, status_for

    leaves = [cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.MvllmError)]
    for cls in leaves:
        if cls is not errors.MvllmError:
            assert cls in STATUS_BY_ERROR, f"{cls.__name__} has no gRPC status"
    assert status_for(errors.MvllmError("x")) is grpc.StatusCode.UNKNOWN


async def test_tune_before_any_sweep_and_with_bad_input(served: str) -> None:
    """No report before a sweep has ended; a sweep that cannot be planned is refused before anything starts."""
    async with grpc.aio.insecure_channel(served) as channel:
        stub = tune_pb2_grpc.TuneServiceStub(channel)
        last = await stub.GetLastTune(tune_pb2.GetLastTuneRequest())
        assert not last.report.trials and last.report.best == 0
        bad = tune_pb2.TuneRequest(model="sim", engine=instance_pb2.ENGINE_KIND_SIM,
                                   configs=[tune_pb2.Split(instances=3, tensor_parallel_size=1)])  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Tune(bad):
                pass
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "3 x TP1 takes 3 sim-gpus; a split uses all 2 chosen" in (refused.value.details() or "")
