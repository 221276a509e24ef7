"""`mvllmctl launch | status | stop | logs`: the engine servers of the daemon's host."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Sequence

import click

from mvllm.v1 import instance_pb2 as pb
from mvllm.v1 import instance_pb2_grpc
from mvllmctl.client import CtlError
from mvllmctl.context import Ctl, json_option, pass_ctl
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.output import print_json, print_table

ENGINES = {"vllm": pb.ENGINE_KIND_VLLM, "sim": pb.ENGINE_KIND_SIM}
DONE = (pb.INSTANCE_STATE_READY, pb.INSTANCE_STATE_FAILED, pb.INSTANCE_STATE_STOPPED)
STOP_WAIT_S = 120.0


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
    no_wait: bool,
    wait_timeout: float,
    engine_args: tuple[str, ...],
    as_json: bool,
) -> None:
    """Start N engine servers of MODEL, T devices each, and wait until they are READY.

    Arguments after `--` go to the engine, e.g. `mvllmctl launch Qwen/Qwen2.5-7B-Instruct -n 4 --tp 2 --
    --max-model-len 8192`. Prints each URL, the comma-separated list, and the `mvllmctl submit` and
    `mvllmctl generate-rollouts` (the seed script's flags) command lines that use them.
    """
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
    )
    started = ctl.client.call(_stub(ctl).LaunchInstances, request)
    names = [i.name for i in started.instances]
    for inst in started.instances:
        click.echo(f"started {inst.name} on {', '.join(inst.devices)} at {inst.url}", err=True)
    final = list(started.instances) if no_wait else _wait_ready(ctl, names, wait_timeout)
    if as_json:
        print_json(pb.ListInstancesResponse(instances=final))
    else:
        _print_ready(final)
    failed = [i for i in final if i.state == pb.INSTANCE_STATE_FAILED]
    if failed:
        details = "; ".join(f"{i.name}: {i.message}" for i in failed)
        raise CtlError(f"{len(failed)} of {len(final)} instances failed: {details}", ExitStatus.FAILED)


def _wait_ready(ctl: Ctl, names: list[str], timeout: float) -> list[pb.Instance]:
    """Poll until every instance is READY or FAILED, showing each one's state on stderr."""
    deadline = time.monotonic() + timeout
    shown: dict[str, str] = {}
    tty = sys.stderr.isatty()
    started = time.monotonic()
    while True:
        listing = ctl.client.call(_stub(ctl).ListInstances, pb.ListInstancesRequest())
        mine = [i for i in listing.instances if i.name in names]
        lines = {i.name: f"{_state(i.state):<10} {i.message}".rstrip() for i in mine}
        elapsed = time.monotonic() - started
        if tty:
            summary = "  ".join(f"{n} {_state(i.state)}" for n, i in ((i.name, i) for i in mine))
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
        click.echo(f"{inst.name}  {_state(inst.state)}  {inst.url}/v1")
    if ready:
        urls = ",".join(f"{i.url}/v1" for i in ready)
        click.echo(f"\nURLs: {urls}")
        model = shlex.quote(ready[0].model)
        click.echo(f"\nmvllmctl submit --model {model} --data prompts.parquet --output rollouts.parquet -k 8 --wait")
        # The seed script's flags, which take the list as it is.
        click.echo(f'mvllmctl generate-rollouts --use_vllm --vllm_base_url "{urls}" \\')
        click.echo(f"    --model_path {model} --data_path data.parquet --output_path rollouts.parquet")


@click.command()
@json_option
@pass_ctl
def status(ctl: Ctl, as_json: bool) -> None:
    """List the instances and the external servers: state, URL, model, engine, devices, PID, and the
    version of the weights they serve (instances launched with --weight-updates)."""
    listing = ctl.client.call(_stub(ctl).ListInstances, pb.ListInstancesRequest())
    if as_json:
        print_json(listing)
        return
    if not listing.instances and not listing.external_servers:
        click.echo("no instances; start some with `mvllmctl launch MODEL` (or `mvllmctl attach URL`)", err=True)
        return
    rows = [
        [i.name, _state(i.state), i.url, i.model, _engine(i.engine), ",".join(i.devices), str(i.pid or "-"),
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
@json_option
@pass_ctl
def stop(ctl: Ctl, names: tuple[str, ...], all_: bool, force: bool, as_json: bool) -> None:
    """Stop instances by NAME, or --all; their devices are freed."""
    if bool(names) == all_:
        raise click.UsageError("name the instances to stop, or give --all (not both)")
    request = pb.StopInstancesRequest(names=names, all=all_, force=force)
    # Engines get 30 s to finish before they are killed: wait for that, whatever --timeout says.
    response = ctl.client.call(_stub(ctl).StopInstances, request, min_timeout_s=STOP_WAIT_S)
    if as_json:
        print_json(response)
        return
    for inst in response.instances:
        click.echo(f"stopped {inst.name}")
    if not response.instances:
        click.echo("no instances to stop", err=True)


@click.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (Ctrl-C to stop).")
@click.option("--tail", "tail", type=click.IntRange(1), default=200, show_default=True, help="Lines to start with.")
@pass_ctl
def logs(ctl: Ctl, name: str, follow: bool, tail: int) -> None:
    """Print an instance's log (the engine's stdout and stderr)."""
    request = pb.GetInstanceLogsRequest(name=name, follow=follow, tail_lines=tail)
    for chunk in ctl.client.stream(_stub(ctl).GetInstanceLogs, request):
        for line in chunk.lines:
            click.echo(line)
