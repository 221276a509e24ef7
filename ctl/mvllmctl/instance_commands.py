"""`mvllmctl launch | status | stop | logs`: the engine servers of the daemon's host, and with `--hosts` (or
HOST/NAME) of the other hosts of its fleet."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Sequence

import click

from mvllm.v1 import instance_pb2 as pb
from mvllm.v1 import instance_pb2_grpc
from mvllmctl.client import CtlError
from mvllmctl.context import Ctl, hosts_option, json_option, pass_ctl, qualified
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.output import print_json, print_table

ENGINES = {"vllm": pb.ENGINE_KIND_VLLM, "sim": pb.ENGINE_KIND_SIM}
DONE = (pb.INSTANCE_STATE_READY, pb.INSTANCE_STATE_FAILED, pb.INSTANCE_STATE_STOPPED)
STOP_WAIT_S = 120.0
LAUNCH_WAIT_S = 120.0  # a fleet launch asks every host first


def _state(value: int) -> str:
    return pb.InstanceState.Name(value).removeprefix("INSTANCE_STATE_")


def _engine(value: int) -> str:
    return pb.EngineKind.Name(value).removeprefix("ENGINE_KIND_").lower()


def _stub(ctl: Ctl) -> instance_pb2_grpc.InstanceServiceStub:
    return instance_pb2_grpc.InstanceServiceStub(ctl.client.channel())


def _env_pairs(values: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--env")
        env[key] = value
    return env


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("model")
@click.option("--instances", "-n", "count", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--tp", type=click.IntRange(1, 64), default=1, show_default=True, help="Tensor parallelism.")
@click.option("--engine", type=click.Choice(sorted(ENGINES)), default="vllm", show_default=True)
@click.option("--name", "name_prefix", metavar="PREFIX", help="Names PREFIX-0, PREFIX-1, ... [from the model]")
@click.option("--devices", metavar="LIST", help="Explicit devices, e.g. 4-7 or 0,1,2,3.")
@click.option("--port-base", type=click.IntRange(1024, 65535), help="First port to try. [the daemon's, 8000]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the engines bind.")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment for the engines (repeatable).")
@click.option("--api-key", help="Given to the engines; the daemon uses it too.")
@click.option("--max-num-seqs", type=click.IntRange(1), help="The engines' --max-num-seqs.")
@click.option("--cpu", is_flag=True, help="vLLM on CPU slots even where the host has GPUs.")
@click.option("--force", is_flag=True, help="Take GPUs that other processes use.")
@click.option(
    "--weight-updates/--no-weight-updates",
    default=None,
    help="vLLM's development routes on, for `mvllmctl weights update`, sleep and wake. They have no"
    " authentication: the engines must bind to loopback. [the daemon's [instances] weight_updates]",
)
@hosts_option("Place the instances on these fleet hosts (packed: fill each in turn). [this host]")
@click.option("--spread", is_flag=True, help="With --hosts: one instance per host in turn.")
@click.option("--no-wait", is_flag=True, help="Return once started; do not wait for READY.")
@click.option("--wait-timeout", type=float, default=900, show_default=True, metavar="SECONDS")
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
@json_option
@pass_ctl
def launch(
    ctl: Ctl,
    model: str,
    count: int,
    tp: int,
    engine: str,
    name_prefix: str | None,
    devices: str | None,
    port_base: int | None,
    host: str,
    env: tuple[str, ...],
    api_key: str | None,
    max_num_seqs: int | None,
    cpu: bool,
    force: bool,
    weight_updates: bool | None,
    hosts: list[str],
    spread: bool,
    no_wait: bool,
    wait_timeout: float,
    engine_args: tuple[str, ...],
    as_json: bool,
) -> None:
    """Start N engine servers of MODEL, T devices each, and wait until they are READY.

    Arguments after `--` go to the engine, e.g. `mvllmctl launch Qwen/Qwen2.5-7B-Instruct -n 4 --tp 2 --
    --max-model-len 8192`. Prints each URL, the comma-separated list, and the `mvllmctl submit` and
    `mvllmctl generate-rollouts` (the seed script's flags) command lines that use them.

    With --hosts, the launch is checked on every host first (free devices, the model's files where MODEL
    is an absolute path, the engine's interpreter) and nothing starts unless all of it fits (exit 4,
    saying what each host has room for); a host that fails mid-launch leaves the others' instances
    running, and is named (exit 1).
    """
    if spread and not hosts:
        raise click.UsageError("--spread places instances over --hosts; give --hosts too")
    request = pb.LaunchInstancesRequest(
        model=model,
        count=count,
        tensor_parallel_size=tp,
        engine=ENGINES[engine],
        devices=devices or "",
        port_base=port_base or 0,
        host=host,
        env=_env_pairs(env),
        engine_args=list(engine_args),
        name_prefix=name_prefix or "",
        api_key=api_key or "",
        force=force,
        cpu=cpu,
        max_num_seqs=max_num_seqs or 0,
        weight_updates=weight_updates,
        hosts=hosts,
        spread=spread,
    )
    started = ctl.client.call(_stub(ctl).LaunchInstances, request, min_timeout_s=LAUNCH_WAIT_S if hosts else 0)
    for inst in started.instances:
        click.echo(f"started {_name(inst)} on {', '.join(inst.devices)} at {inst.url}", err=True)
    for failure in started.failures:
        click.echo(f"{failure.host}: launch failed: {failure.message}", err=True)
    final = list(started.instances) if no_wait else _wait_ready(ctl, started.instances, hosts, wait_timeout)
    if as_json:
        print_json(pb.LaunchInstancesResponse(instances=final, failures=started.failures))
    else:
        _print_ready(final)
    failed = [i for i in final if i.state == pb.INSTANCE_STATE_FAILED]
    said = [f"{len(failed)} of {len(final)} instances failed: " + "; ".join(f"{_name(i)}: {i.message}" for i in failed)]
    said = said if failed else []
    if started.failures:
        said.append(f"the launch failed on {', '.join(f.host for f in started.failures)} (above)")
    if said:
        raise CtlError("; ".join(said), ExitStatus.FAILED)


def _name(inst: pb.Instance) -> str:
    return qualified(inst.name, inst.fleet_host)


def _wait_ready(ctl: Ctl, launched: Sequence[pb.Instance], hosts: list[str], timeout: float) -> list[pb.Instance]:
    """Poll until every instance is READY or FAILED, showing each one's state on stderr."""
    names = {_name(i) for i in launched}
    deadline = time.monotonic() + timeout
    shown: dict[str, str] = {}
    tty = sys.stderr.isatty()
    started = time.monotonic()
    while True:
        listing = ctl.client.call(_stub(ctl).ListInstances, pb.ListInstancesRequest(hosts=hosts))
        mine = [i for i in listing.instances if _name(i) in names]
        lines = {_name(i): f"{_state(i.state):<10} {i.message}".rstrip() for i in mine}
        elapsed = time.monotonic() - started
        if tty:
            summary = "  ".join(f"{_name(i)} {_state(i.state)}" for i in mine)
            click.echo(f"\r{elapsed:5.0f}s  {summary}\x1b[K", err=True, nl=False)
        for name, line in lines.items():
            if not tty and shown.get(name) != line:
                click.echo(f"{elapsed:5.0f}s  {name}  {line}", err=True)
        shown = lines
        if len(mine) < len(names) or all(i.state in DONE for i in mine):
            if tty:
                click.echo("", err=True)
            return mine
        if time.monotonic() > deadline:
            raise CtlError(f"instances not READY after {timeout:g}s; see `mvllmctl status`", ExitStatus.FAILED)
        time.sleep(0.5)


def _print_ready(instances: Sequence[pb.Instance]) -> None:
    ready = [i for i in instances if i.state == pb.INSTANCE_STATE_READY]
    for inst in instances:
        click.echo(f"{_name(inst)}  {_state(inst.state)}  {inst.url}/v1")
    if ready:
        urls = ",".join(f"{i.url}/v1" for i in ready)
        click.echo(f"\nURLs: {urls}")
        model = shlex.quote(ready[0].model)
        click.echo(f"\nmvllmctl submit --model {model} --data prompts.parquet --output rollouts.parquet -k 8 --wait")
        # The seed script's flags, which take the list as it is.
        click.echo(f'mvllmctl generate-rollouts --use_vllm --vllm_base_url "{urls}" \\')
        click.echo(f"    --model_path {model} --data_path data.parquet --output_path rollouts.parquet")


@click.command()
@hosts_option("List the instances of these fleet hosts. [this host]")
@json_option
@pass_ctl
@click.pass_context
def status(ctx: click.Context, ctl: Ctl, hosts: list[str], as_json: bool) -> None:
    """List the instances (as HOST/NAME) and the external servers: state, URL, model, engine, devices,
    PID, and the version of the weights they serve (instances launched with --weight-updates). A URL is
    the engine's own, on its host's loopback. Exit 1 when a host named could not be asked."""
    listing = ctl.client.call(_stub(ctl).ListInstances, pb.ListInstancesRequest(hosts=hosts))
    for failure in listing.failures:
        click.echo(f"{failure.host}: {failure.message}", err=True)
    if as_json:
        print_json(listing)
    else:
        _status_table(listing)
    if listing.failures:
        ctx.exit(ExitStatus.FAILED)


def _status_table(listing: pb.ListInstancesResponse) -> None:
    if not listing.instances and not listing.external_servers:
        click.echo("no instances; start some with `mvllmctl launch MODEL` (or `mvllmctl attach URL`)", err=True)
        return
    rows = [
        [_name(i), _state(i.state), i.url, i.model, _engine(i.engine), ",".join(i.devices), str(i.pid or "-"),
         str(i.restarts), _weights(i), i.message[:60]]
        for i in listing.instances
    ] + [
        [e.name, _state(e.state), e.url, e.model, "external", "-", "-", "-", "-", e.message[:60]]
        for e in listing.external_servers
    ]  # fmt: skip
    headers = ["NAME", "STATE", "URL", "MODEL", "ENGINE", "DEVICES", "PID", "RESTARTS", "WEIGHTS", "MESSAGE"]
    print_table(headers, rows)


def _weights(inst: pb.Instance) -> str:
    """The version of its weights ("-" without weight updates), and whether it sleeps."""
    if not inst.weight_updates:
        return "-"
    return inst.weight_version + (f" (asleep {inst.sleep_level})" if inst.sleep_level else "")


@click.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Stop every instance.")
@click.option("--force", is_flag=True, help="Kill at once, without letting the engine finish.")
@hosts_option("With --all: stop every instance of these fleet hosts. [this host]")
@json_option
@pass_ctl
@click.pass_context
def stop(
    ctx: click.Context, ctl: Ctl, names: tuple[str, ...], all_: bool, force: bool, hosts: list[str], as_json: bool
) -> None:
    """Stop instances by NAME (this host's) or HOST/NAME (another fleet host's), or --all; their devices
    are freed."""
    if bool(names) == all_:
        raise click.UsageError("name the instances to stop, or give --all (not both)")
    if hosts and not all_:
        raise click.UsageError("--hosts goes with --all; name another host's instances as HOST/NAME")
    request = pb.StopInstancesRequest(names=names, all=all_, force=force, hosts=hosts)
    # Engines get 30 s to finish before they are killed: wait for that, whatever --timeout says.
    response = ctl.client.call(_stub(ctl).StopInstances, request, min_timeout_s=STOP_WAIT_S)
    for failure in response.failures:
        click.echo(f"{failure.host}: {failure.message}", err=True)
    if as_json:
        print_json(response)
    else:
        for inst in response.instances:
            click.echo(f"stopped {_name(inst)}")
        if not response.instances:
            click.echo("no instances to stop", err=True)
    if response.failures:
        ctx.exit(ExitStatus.FAILED)


@click.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (Ctrl-C to stop).")
@click.option("--tail", "tail", type=click.IntRange(1), default=200, show_default=True, help="Lines to start with.")
@pass_ctl
def logs(ctl: Ctl, name: str, follow: bool, tail: int) -> None:
    """Print an instance's log (the engine's stdout and stderr): NAME on this host, HOST/NAME on another
    fleet host."""
    request = pb.GetInstanceLogsRequest(name=name, follow=follow, tail_lines=tail)
    for chunk in ctl.client.stream(_stub(ctl).GetInstanceLogs, request):
        for line in chunk.lines:
            click.echo(line)
