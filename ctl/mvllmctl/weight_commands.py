"""`mvllmctl weights update | sleep | wake`: new weights on every instance of a model, in place (instances
launched with --weight-updates), and sleep and wake for training on the same GPUs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mvllm.v1 import weights_pb2 as pb
from mvllm.v1 import weights_pb2_grpc
from mvllmctl.client import CtlError
from mvllmctl.context import Ctl, hosts_option, json_option, pass_ctl, qualified
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.output import print_json, print_table

MODES = {"keep": pb.UPDATE_MODE_KEEP, "wait": pb.UPDATE_MODE_WAIT, "abort": pb.UPDATE_MODE_ABORT}
SLEEP_WAIT_S = 600.0  # a `wait` pause lets the requests in flight finish first


def _stub(ctl: Ctl) -> weights_pb2_grpc.WeightServiceStub:
    return weights_pb2_grpc.WeightServiceStub(ctl.client.channel())


def _step(value: int) -> str:
    return pb.UpdateStep.Name(value).removeprefix("UPDATE_STEP_").lower()


@click.group()
def weights() -> None:
    """The weights of the instances launched with --weight-updates: update them in place."""


@weights.command()
@click.argument("model")
@click.option("--path", "-p", required=True, type=click.Path(path_type=Path), help="The checkpoint directory.")
@click.option("--version", "-V", "version", metavar="V", help="The new version's name. [the path's last part]")
@click.option(
    "--mode",
    type=click.Choice(sorted(MODES)),
    default="keep",
    show_default=True,
    help="keep: requests in flight freeze and go on under the new weights (their samples span two versions);"
    " wait: they finish first; abort: they end, and mvllmd sends them again.",
)
@click.option("--rolling", is_flag=True, help="One instance at a time, so that the others keep serving.")
@hosts_option("Update the model's instances on these fleet hosts (the path must be there on each). [this host]")
@json_option
@pass_ctl
def update(
    ctl: Ctl, model: str, path: Path, version: str | None, mode: str, rolling: bool, hosts: list[str], as_json: bool
) -> int:
    """Load the checkpoint at PATH into every instance of MODEL without restarting them: pause each, reload,
    set the version, reset the prefix cache, resume. Their specs keep the new path and version, so a
    restart brings the new weights back. An instance whose update fails is restarted on the new path;
    the command then exits 1. Job rows carry the version that made each token (weight_version,
    weight_versions); the front door's answers say it in X-Mvllm-Weight-Version. With --hosts, PATH is
    checked on every host before anything changes; the hosts update at once (--rolling: one after another).

    \b
    Examples:
      mvllmctl weights update Qwen/Qwen2.5-7B-Instruct --path /ckpt/step_200
      mvllmctl weights update my-policy -p /ckpt/step_300 --version 300 --rolling --mode wait
    """
    request = pb.UpdateWeightsRequest(
        model=model, path=str(path.absolute()), version=version or "", mode=MODES[mode], rolling=rolling, hosts=hosts
    )
    last = None
    shown: dict[str, str] = {}
    for response in ctl.client.stream(_stub(ctl).UpdateWeights, request):
        last = response
        if not as_json:
            _progress(response, shown)
    if last is None:
        raise CtlError("the daemon ended the update without a word; see its log", ExitStatus.FAILED)
    if as_json:
        print_json(last)
    else:
        _summary(last)
    for failure in last.failures:
        click.echo(f"{failure.host}: {failure.message}", err=True)
    failed = [i for i in last.instances if i.step == pb.UPDATE_STEP_FAILED]
    return ExitStatus.FAILED if failed or last.failures else ExitStatus.SUCCESS


def _name(inst: pb.InstanceUpdate) -> str:
    return qualified(inst.name, inst.fleet_host)


def _progress(response: pb.UpdateWeightsResponse, shown: dict[str, str]) -> None:
    """Each instance's step on stderr: redrawn in place on a terminal, a line per change elsewhere."""
    done = sum(1 for i in response.instances if i.step in (pb.UPDATE_STEP_DONE, pb.UPDATE_STEP_FAILED))
    if sys.stderr.isatty():
        steps = "  ".join(f"{_name(i)} {_step(i.step)}" for i in response.instances)
        click.echo(f"\r{response.elapsed_seconds:5.1f}s  {done}/{len(response.instances)}  {steps}\x1b[K", err=True,
                   nl=False)  # fmt: skip
        if response.done:
            click.echo("", err=True)
        return
    for inst in response.instances:
        if shown.get(_name(inst)) != _step(inst.step):
            shown[_name(inst)] = _step(inst.step)
            click.echo(f"{response.elapsed_seconds:5.1f}s  {_name(inst)}  {_step(inst.step)}", err=True)


def _summary(response: pb.UpdateWeightsResponse) -> None:
    rows = [
        [_name(i), _step(i.step), i.old_version, i.version, f"{i.seconds:.2f}" if i.seconds else "-", i.error]
        for i in response.instances
    ]
    print_table(["NAME", "RESULT", "FROM", "TO", "SECONDS", "ERROR"], rows)
    click.echo(f"{response.model}: version {response.version}, in {response.elapsed_seconds:.1f}s", err=True)


@click.command()
@click.argument("model")
@click.option("--level", type=click.IntRange(1, 2), default=1, show_default=True,
              help="1: weights offloaded to CPU memory, KV cache discarded; 2: both discarded.")  # fmt: skip
@json_option
@pass_ctl
def sleep(ctl: Ctl, model: str, level: int, as_json: bool) -> int:
    """Put every instance of MODEL to sleep, to free their GPUs for training: their requests in flight
    finish first, and jobs keep their work for the servers that are awake (or wait). vLLM on GPUs only:
    the vLLM CPU build cannot sleep."""
    response = ctl.client.call(_stub(ctl).SleepInstances, pb.SleepInstancesRequest(model=model, level=level),
                               min_timeout_s=SLEEP_WAIT_S)  # fmt: skip
    return _results(response, "asleep", as_json)


@click.command()
@click.argument("model")
@json_option
@pass_ctl
def wake(ctl: Ctl, model: str, as_json: bool) -> int:
    """Wake every instance of MODEL; after a level-2 sleep, their current weights are loaded again."""
    response = ctl.client.call(_stub(ctl).WakeInstances, pb.WakeInstancesRequest(model=model),
                               min_timeout_s=SLEEP_WAIT_S)  # fmt: skip
    return _results(response, "awake", as_json)


def _results(response: pb.SleepInstancesResponse | pb.WakeInstancesResponse, done: str, as_json: bool) -> int:
    if as_json:
        print_json(response)
    else:
        for inst in response.instances:
            click.echo(f"{inst.name}  {done if inst.ok else 'FAILED'}  {inst.error}".rstrip())
    return ExitStatus.SUCCESS if all(i.ok for i in response.instances) else ExitStatus.FAILED
