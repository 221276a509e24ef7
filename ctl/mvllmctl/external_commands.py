"""`mvllmctl attach | detach`: servers that mvllmd did not launch (vLLM under Slurm or Kubernetes, another
team's), registered by URL; jobs and the front door use them like the daemon's own instances."""

from __future__ import annotations

import os

import click

from mvllm.v1 import instance_pb2 as pb
from mvllm.v1 import instance_pb2_grpc
from mvllmctl.client import CtlError
from mvllmctl.context import Ctl, json_option, pass_ctl
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.output import print_json

ATTACH_WAIT_S = 30.0  # the daemon asks the server itself (10 s at most), then checks its health


def _stub(ctl: Ctl) -> instance_pb2_grpc.InstanceServiceStub:
    return instance_pb2_grpc.InstanceServiceStub(ctl.client.channel())


def _state(value: int) -> str:
    return pb.InstanceState.Name(value).removeprefix("INSTANCE_STATE_")


def _key_from(variable: str | None) -> str:
    if variable is None:
        return ""
    key = os.environ.get(variable, "")
    if not key:
        raise CtlError(f"--api-key-env: the environment variable {variable} is not set, or empty", ExitStatus.USAGE)
    return key


@click.command()
@click.argument("url")
@click.option("--model", help="The served model name. [the one the server lists]")
@click.option("--name", help="Unique among instances and external servers. [from the host and port]")
@click.option("--api-key-env", metavar="VAR", help="Read the server's API key from this environment variable.")
@click.option("--max-num-seqs", type=click.IntRange(1), help="Its batch limit, for jobs. [the daemon's, 256]")
@json_option
@pass_ctl
def attach(
    ctl: Ctl,
    url: str,
    model: str | None,
    name: str | None,
    api_key_env: str | None,
    max_num_seqs: int | None,
    as_json: bool,
) -> None:
    """Register a server that mvllmd did not launch, at URL (http[s]://HOST[:PORT], with or without /v1).

    The daemon checks at once that it answers and serves the model, then health-checks it like an
    instance (READY, UNHEALTHY, and back) and never restarts it. Jobs of its model and the HTTP front
    door use it while it is READY. The key is kept readable by mvllmd's user only, and never shown.
    """
    request = pb.AttachServerRequest(
        url=url, model=model or "", name=name or "", api_key=_key_from(api_key_env), max_num_seqs=max_num_seqs or 0
    )
    response = ctl.client.call(_stub(ctl).AttachServer, request, min_timeout_s=ATTACH_WAIT_S)
    if as_json:
        print_json(response)
        return
    server = response.server
    click.echo(f"attached {server.name}  {_state(server.state)}  {server.url}/v1  {server.model}")
    if server.message:
        click.echo(f"{server.name}: {server.message}", err=True)


@click.command()
@click.argument("name")
@json_option
@pass_ctl
def detach(ctl: Ctl, name: str, as_json: bool) -> None:
    """Forget the external server NAME: jobs and the front door stop using it; the server runs on."""
    response = ctl.client.call(_stub(ctl).DetachServer, pb.DetachServerRequest(name=name))
    if as_json:
        print_json(response)
        return
    click.echo(f"detached {response.server.name}")
