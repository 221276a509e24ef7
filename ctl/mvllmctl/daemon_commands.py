"""`mvllmctl info` and `mvllmctl devices`: what the daemon is and what it owns."""

from __future__ import annotations

import click

from mvllm.v1 import daemon_pb2 as pb
from mvllm.v1 import daemon_pb2_grpc
from mvllmctl.context import Ctl, hosts_option, json_option, pass_ctl
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.output import duration, gib, print_fields, print_json, print_table

KINDS = {"gpu": pb.DEVICE_KIND_GPU, "cpu-slot": pb.DEVICE_KIND_CPU_SLOT, "sim-gpu": pb.DEVICE_KIND_SIM_GPU}


@click.command()
@json_option
@pass_ctl
def info(ctl: Ctl, as_json: bool) -> None:
    """Show the daemon's version, host, uptime, unit manager and listen addresses."""
    stub = daemon_pb2_grpc.DaemonServiceStub(ctl.client.channel())
    response = ctl.client.call(stub.GetDaemonInfo, pb.GetDaemonInfoRequest())
    if as_json:
        print_json(response)
        return
    started = response.start_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")
    print_fields(
        [
            ("version", response.version),
            ("host", response.hostname),
            ("pid", str(response.pid)),
            ("uptime", f"{duration(response.uptime_seconds)} (since {started})"),
            (
                "unit manager",
                pb.UnitManager.Name(response.unit_manager).removeprefix("UNIT_MANAGER_").lower(),
            ),
            ("under systemd", "yes" if response.under_systemd else "no"),
            ("listening on", ", ".join(response.listen_addresses)),
            ("front door", ", ".join(response.http_urls) or "off"),
            ("state dir", response.state_dir),
        ]
    )


@click.command()
@click.option("--kind", type=click.Choice(sorted(KINDS)), help="Only devices of this kind.")
@hosts_option("List the devices of these fleet hosts. [this host]")
@json_option
@pass_ctl
@click.pass_context
def devices(ctx: click.Context, ctl: Ctl, kind: str | None, hosts: list[str], as_json: bool) -> None:
    """List the devices the daemon can assign: GPUs, CPU slots and simulated GPUs.

    GPUs are read through NVML (or nvidia-smi). CPU slots and simulated GPUs are declared in the
    daemon's config ([inventory] cpu_slots, sim_gpus) and are never shown as GPUs. With --hosts, each
    device's host is shown first; exit 1 when a host named could not be asked.
    """
    stub = daemon_pb2_grpc.DaemonServiceStub(ctl.client.channel())
    request = pb.ListDevicesRequest(kind=KINDS[kind] if kind else pb.DEVICE_KIND_UNSPECIFIED, hosts=hosts)
    response = ctl.client.call(stub.ListDevices, request)
    for failure in response.failures:
        click.echo(f"{failure.host}: {failure.message}", err=True)
    if as_json:
        print_json(response)
    else:
        _devices_table(response, kind, bool(hosts))
    if response.failures:
        ctx.exit(ExitStatus.FAILED)


def _devices_table(response: pb.ListDevicesResponse, kind: str | None, with_host: bool) -> None:
    if not response.devices:
        source = pb.GpuSource.Name(response.gpu_source).removeprefix("GPU_SOURCE_").lower()
        click.echo(
            f"no devices{f' of kind {kind}' if kind else ''} (GPUs read from: {source}); "
            "start mvllmd with --cpu-slots N or --sim-gpus N to declare others",
            err=True,
        )
        return
    headers = ["KIND", "INDEX", "UUID", "NAME", "MEM FREE/TOTAL GiB", "PROCESSES", "INSTANCE"]
    rows = [_device_row(d) for d in response.devices]
    if with_host:
        headers, rows = (
            ["HOST", *headers],
            [[d.fleet_host, *row] for d, row in zip(response.devices, rows, strict=True)],
        )
    print_table(headers, rows)


def _device_row(device: pb.Device) -> list[str]:
    memory = f"{gib(device.memory_free_bytes)}/{gib(device.memory_total_bytes)}" if device.memory_total_bytes else "-"
    processes = ",".join(f"{p.pid}({p.name})" if p.name else str(p.pid) for p in device.processes) or "-"
    return [
        pb.DeviceKind.Name(device.kind).removeprefix("DEVICE_KIND_").lower().replace("_", "-"),
        str(device.index),
        device.uuid,
        device.name,
        memory,
        processes,
        device.instance or "-",
    ]
