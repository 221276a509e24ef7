"""`mvllmctl hosts [add | remove]`: the fleet of hosts this daemon coordinates. Each host runs its own
mvllmd; the daemon asked here dials the others over mutual TLS (its certificate from `mvllmd certs
host`), and its jobs use their READY instances too."""

from __future__ import annotations

import click

from mvllm.v1 import fleet_pb2 as pb
from mvllm.v1 import fleet_pb2_grpc
from mvllmctl.context import Ctl, json_option, pass_ctl
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.output import print_json, print_table

HOSTS_WAIT_S = 15.0  # the daemon asks every peer, 5 s at most each, in parallel


def _stub(ctl: Ctl) -> fleet_pb2_grpc.FleetServiceStub:
    return fleet_pb2_grpc.FleetServiceStub(ctl.client.channel())


def _row(host: pb.Host) -> list[str]:
    if not host.reachable:
        return [host.name, host.address or "(this host)", "no", "-", "-", "-"]
    gpus = f"{host.gpus_free}/{host.gpus_total}"
    return [host.name, host.address or "(this host)", "yes", host.version, gpus, str(host.instances)]


@click.group(invoke_without_command=True)
@json_option
@pass_ctl
@click.pass_context
def hosts(ctx: click.Context, ctl: Ctl, as_json: bool) -> None:
    """List the fleet: this host, then each peer, with its address, whether the daemon reaches it now, its
    mvllm version, its GPUs free of total (simulated ones too) and its instances.

    \b
    Peers come from the daemon's config ([[fleet.hosts]]: name and address) and from `hosts add`. A peer
    is dialled over mutual TLS with the daemon's own certificate (mvllmd certs host NAME --address ...),
    and its READY instances take work from the daemon's jobs while it is reachable. Exit 1 when a peer
    is unreachable.
    """
    if ctx.invoked_subcommand is not None:
        return
    response = ctl.client.call(_stub(ctl).ListHosts, pb.ListHostsRequest(), min_timeout_s=HOSTS_WAIT_S)
    if as_json:
        print_json(response)
    else:
        print_table(["HOST", "ADDRESS", "REACHABLE", "VERSION", "GPUS FREE", "INSTANCES"],
                    [_row(h) for h in response.hosts])  # fmt: skip
        for host in response.hosts:
            if host.message:
                click.echo(f"{host.name}: {host.message}", err=True)
    if not all(h.reachable for h in response.hosts):
        ctx.exit(ExitStatus.FAILED)


@hosts.command("add")
@click.argument("name")
@click.argument("address")
@json_option
@pass_ctl
def add(ctl: Ctl, name: str, address: str, as_json: bool) -> None:
    """Add the peer NAME (its certificate's name) at ADDRESS (its gRPC HOST:PORT). The daemon keeps it in
    its state directory and dials it at once; `hosts` shows whether it answered."""
    request = pb.AddHostRequest(name=name, address=address)
    response = ctl.client.call(_stub(ctl).AddHost, request, min_timeout_s=HOSTS_WAIT_S)
    if as_json:
        print_json(response)
        return
    host = response.host
    state = "reachable" if host.reachable else f"not reachable yet{f' ({host.message})' if host.message else ''}"
    click.echo(f"added {host.name} at {host.address}: {state}")


@hosts.command("remove")
@click.argument("name")
@json_option
@pass_ctl
def remove(ctl: Ctl, name: str, as_json: bool) -> None:
    """Forget the peer NAME (one added with `hosts add`; those of the config file are removed there). Its
    instances leave the daemon's jobs at once, and their requests go elsewhere; they keep running."""
    response = ctl.client.call(_stub(ctl).RemoveHost, pb.RemoveHostRequest(name=name), min_timeout_s=HOSTS_WAIT_S)
    if as_json:
        print_json(response)
        return
    click.echo(f"removed {response.host.name} ({response.host.address})")
