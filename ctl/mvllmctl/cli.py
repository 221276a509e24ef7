"""The `mvllmctl` command line: talks to mvllmd over gRPC.

Results go to stdout, progress and diagnostics to stderr. Every failure is one line and an exit status
(exit_codes.py); no command prints a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click
from click.shell_completion import get_completion_class

from mvllm import __version__
from mvllmctl.client import Client, CtlError, resolve_address, resolve_tls
from mvllmctl.context import Ctl
from mvllmctl.daemon_commands import devices, info
from mvllmctl.exit_codes import HELP as EXIT_HELP
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.external_commands import attach, detach
from mvllmctl.host_commands import hosts
from mvllmctl.instance_commands import launch, logs, status, stop
from mvllmctl.job_commands import cancel, job, jobs, submit, watch
from mvllmctl.rollouts_command import generate_rollouts
from mvllmctl.top import top
from mvllmctl.tune_command import tune
from mvllmctl.weight_commands import sleep, wake, weights

EPILOG = f"""\b
Address: --address, else $MVLLM_ADDRESS, else the first socket that exists of
$XDG_RUNTIME_DIR/mvllmd/mvllmd.sock and /run/mvllmd/mvllmd.sock.
Forms: unix:/abs/path (or just /abs/path), host:port.
A daemon on TCP with TLS: --tls-ca, and --tls-cert/--tls-key for mutual TLS.

{EXIT_HELP}

\b
Shell completion: eval "$(mvllmctl completion bash)"   (also zsh, fish)
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mvllmctl")
@click.option("--address", "-a", metavar="ADDR", help="The daemon's address (see below).")
@click.option("--timeout", type=float, default=30.0, show_default=True, metavar="SECONDS", help="Per-call deadline.")
@click.option("--tls-ca", metavar="PEM", help="CA of the daemon's TLS certificate (TCP). [$MVLLM_TLS_CA]")
@click.option("--tls-cert", metavar="PEM", help="Client certificate, for mutual TLS. [$MVLLM_TLS_CERT]")
@click.option("--tls-key", metavar="PEM", help="Its private key. [$MVLLM_TLS_KEY]")
@click.pass_context
def cli(
    ctx: click.Context,
    /,
    address: str | None,
    timeout: float,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """Control mvllmd: its devices, its engine instances (launch, status, stop, logs), servers it did not
    launch (attach, detach), rollout jobs (submit, jobs, job, watch, cancel; generate-rollouts for the
    seed script's flags), the instances' weights (weights update, sleep, wake), the fleet of hosts
    (hosts, hosts add, hosts remove), and the best way to split the GPUs (tune); top shows them all, live."""
    client = Client(resolve_address(address, os.environ), timeout, resolve_tls(tls_ca, tls_cert, tls_key, os.environ))
    ctx.call_on_close(client.close)
    ctx.obj = Ctl(client=client)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script, e.g. eval "$(mvllmctl completion bash)"."""
    completion_class = get_completion_class(shell)
    assert completion_class is not None  # the Choice above admits only shells click knows
    click.echo(completion_class(cli, {}, "mvllmctl", "_MVLLMCTL_COMPLETE").source())


for command in (info, devices, top, launch, status, stop, logs, attach, detach, submit, jobs, job, watch, cancel,
                generate_rollouts, weights, sleep, wake, hosts, tune):  # fmt: skip
    cli.add_command(command)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    try:
        result = cli.main(args=argv, prog_name="mvllmctl", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return ExitStatus.USAGE if exc.exit_code == 2 else ExitStatus.FAILED
    except CtlError as exc:
        click.echo(f"mvllmctl: {exc}", err=True)
        return exc.status
    except (click.Abort, KeyboardInterrupt):
        click.echo("mvllmctl: interrupted", err=True)
        return ExitStatus.INTERRUPTED
    except Exception as exc:  # the promise: never a traceback
        click.echo(f"mvllmctl: unexpected error: {type(exc).__name__}: {exc}", err=True)
        return ExitStatus.FAILED
    return result if isinstance(result, int) else ExitStatus.SUCCESS  # --help and --version return 0


def main() -> None:
    sys.exit(run())
