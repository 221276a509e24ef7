"""The `mvllmd` command: run the daemon, or install its systemd units.

Exit status: 0 stopped cleanly; 1 could not start or failed while running (another daemon holds the
socket, a device source failed); 2 usage error or invalid configuration; 130 interrupted.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import uvloop

from mvllm import __version__
from mvllmd import certs, errors
from mvllmd.config import OPTIONS, load_config
from mvllmd.instances.install import Scope, install_units, reload_manager, unit_dir
from mvllmd.notify import Notifier
from mvllmd.server import serve

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
USAGE_ERRORS = (errors.ConfigError, errors.AddressError)

EPILOG = """\b
Addresses use gRPC target syntax: unix:/abs/path or host:port.
Default socket, the first that applies: $RUNTIME_DIRECTORY/mvllmd.sock (under systemd),
$XDG_RUNTIME_DIR/mvllmd/mvllmd.sock, /run/mvllmd/mvllmd.sock (root).
Plain TCP is allowed on loopback only. Off loopback, mvllmd needs mutual TLS
(--tls-cert, --tls-key, --tls-client-ca), or --insecure-tcp for a trusted network.

\b
Exit status: 0 stopped cleanly, 1 failed, 2 usage or configuration error, 130 interrupted.

\b
Examples:
  mvllmd --sim-gpus 8                         # default socket, 8 simulated GPUs
  mvllmd --listen unix:/tmp/m.sock --listen 127.0.0.1:7070
  mvllmd --listen 0.0.0.0:7070 --tls-cert /etc/mvllm/server.pem --tls-key /etc/mvllm/server.key \\
         --tls-client-ca /etc/mvllm/clients-ca.pem
  mvllmd --config /etc/mvllm/mvllmd.toml      # see examples/mvllmd.toml
  mvllmd install-units --user                 # then: systemctl --user enable --now mvllmd
"""


@click.group(invoke_without_command=True, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mvllmd")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file (all keys optional).")
@click.option("--listen", multiple=True, metavar="ADDR", help="Listen address; repeat for several. [default socket]")
@click.option("--state-dir", type=click.Path(resolve_path=True), help="Where state is kept.")
@click.option("--socket-group", metavar="GROUP", help="Group that owns the unix socket (mode 0660).")
@click.option("--insecure-tcp/--no-insecure-tcp", default=None, help="Allow TCP off loopback without mutual TLS.")
@click.option("--tls-cert", type=click.Path(resolve_path=True), metavar="PEM", help="Certificate: TCP speaks TLS.")
@click.option("--tls-key", type=click.Path(resolve_path=True), metavar="PEM", help="The certificate's private key.")
@click.option("--tls-client-ca", type=click.Path(resolve_path=True), metavar="PEM", help="CA of clients (mutual TLS).")
@click.option("--drain-timeout", type=float, metavar="SECONDS", help="On SIGTERM, wait this long for calls. [30]")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="[info]")
@click.option("--unit-manager", type=click.Choice(["auto", "systemd-system", "systemd-user", "process"]), help="[auto]")
@click.option("--cpu-slots", type=int, metavar="N", help="Declare N slots for CPU engines (vLLM CPU build). [0]")
@click.option("--sim-gpus", type=int, metavar="N", help="Declare N simulated GPUs for mvllm-sim. [0]")
@click.option(
    "--gpu-source",
    type=click.Choice(["auto", "nvml", "nvidia-smi", "none"]),
    help="Where to read GPUs. [auto]",
)
@click.option("--vllm-python", metavar="PATH", help="Interpreter of the vLLM environment ([engine.vllm] python).")
@click.option("--hf-home", metavar="DIR", help="HF_HOME for engines (model cache).")
@click.option("--hf-token-file", metavar="FILE", help="File whose content engines get as HF_TOKEN.")
@click.option("--port-base", type=int, metavar="PORT", help="First port for instances. [8000]")
@click.option("--probe-interval", type=float, metavar="SECONDS", help="Health probe interval. [2]")
@click.option("--hang-timeout", type=float, metavar="SECONDS", help="No progress this long: UNHEALTHY. [30]")
@click.option("--max-restarts", type=int, metavar="N", help="Restarts in 5 minutes before FAILED. [5]")
@click.option("--start-timeout", type=float, metavar="SECONDS", help="Not READY this long: FAILED. [1800]")
@click.option("--weight-updates/--no-weight-updates", default=None,
              help="Launch instances with weight updates on (loopback only), unless a launch says. [off]")  # fmt: skip
@click.option("--max-running-jobs", type=int, metavar="N", help="Jobs running at once; more wait QUEUED. [4]")
@click.option("--job-max-concurrent", type=int, metavar="N", help="A job's samples in flight, by default. [1024]")
@click.option("--endpoint-max-num-seqs", type=int, metavar="N", help="Batch limit of --endpoints servers. [256]")
@click.option("--job-hang-timeout", type=float, metavar="SECONDS", help="Server finishing nothing: hung. [120]")
@click.option("--job-stop-drain", type=float, metavar="SECONDS", help="On cancel/SIGTERM, requests may finish. [20]")
@click.option("--http-listen", multiple=True, metavar="URL",
              help="Front door URL: http(s)://HOST:PORT; repeat; none: off. [http://127.0.0.1:7080]")  # fmt: skip
@click.option("--http-token-file", metavar="FILE", help="Front door bearer tokens, one per line (mode 600).")
@click.option("--http-session-idle", type=float, metavar="SECONDS", help="Front door: idle sessions end. [600]")
@click.option("--http-sticky-factor", type=float, metavar="X",
              help="Front door: a session moves off a server X times slower than the least loaded. [2]")  # fmt: skip
@click.option("--http-reserve", type=float, metavar="SHARE",
              help="Front door: the share of each server's batch jobs leave free while it is used. [0.1]")  # fmt: skip
@click.option(
    "--insecure-http/--no-insecure-http", default=None, help="Allow the front door off loopback without TLS/tokens."
)
@click.option("--fleet-name", metavar="NAME", help="This host's name in the fleet. [its certificate's]")
@click.option("--fleet-host", multiple=True, metavar="NAME=HOST:PORT", help="A peer (mutual TLS); repeat.")
@click.pass_context
def cli(ctx: click.Context, /, config_file: Path | None, **flags: Any) -> None:
    """mvllmd: owns this host's GPUs and the vLLM servers on them, and runs rollout jobs across them.

    Without a command, run the daemon in the foreground until SIGTERM or Ctrl-C. Logs go to stderr.
    Flags override the config file, which overrides the defaults.
    """
    if ctx.invoked_subcommand is not None:
        return
    overrides = {option.name: flags[option.flag.lstrip("-").replace("-", "_")] for option in OPTIONS}
    overrides["daemon.listen"] = list(flags["listen"]) or None
    overrides["http.listen"] = list(flags["http_listen"]) or None
    overrides["fleet.hosts"] = list(flags["fleet_host"]) or None
    config = load_config(config_file, overrides, os.environ, os.geteuid())
    _setup_logging(config.daemon.log_level, journald=bool(os.environ.get("JOURNAL_STREAM")))
    os.umask(0o077)  # state and sockets are private; listeners.py opens the socket to its group
    notifier = Notifier(os.environ, os.getpid())
    under_systemd = notifier.enabled or bool(os.environ.get("INVOCATION_ID"))
    _quiet_collector()
    try:
        uvloop.run(serve(config, notifier, under_systemd, os.environ))  # README, "Choices"
    except errors.MvllmError as exc:
        notifier.status(f"failed: {exc}")
        raise


@cli.command("install-units")
@click.option("--user", "scope", flag_value="user", help="Install for the user manager (systemctl --user).")
@click.option("--system", "scope", flag_value="system", default=True, help="Install for the system manager. [default]")
@click.option("--runtime", is_flag=True, help="Install into the manager's runtime directory (gone at reboot).")
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), help="Run with --config FILE."
)
@click.option("--no-reload", is_flag=True, help="Do not run systemctl daemon-reload afterwards.")
def install_units_command(scope: Scope, runtime: bool, config_file: Path | None, no_reload: bool) -> None:
    """Install mvllmd.service for a systemd manager.

    \b
    system (default)  /etc/systemd/system        --runtime: /run/systemd/system
    --user            ~/.config/systemd/user     --runtime: $XDG_RUNTIME_DIR/systemd/user
    """
    for path in install_units(unit_dir(scope, runtime, os.environ), config_file):
        click.echo(f"installed {path}")
    user = "--user " if scope == "user" else ""
    problem = None if no_reload else reload_manager(scope)
    if no_reload or problem:
        click.echo(f"note: run 'systemctl {user}daemon-reload'" + (f" ({problem})" if problem else ""), err=True)
    enable = "start" if runtime else "enable --now"
    click.echo(f"next: systemctl {user}{enable} mvllmd", err=True)


CERTS_EPILOG = """\b
Files (DIR is --dir, the current directory unless given):
  DIR/ca.pem     the fleet CA's certificate: give it to every host (mvllmd --tls-client-ca)
                 and every user (mvllmctl --tls-ca)
  DIR/ca.key     the CA's key: it signs new hosts and users. It stays on the admin's machine:
                 never copy it to a host
  DIR/HOST.pem   a host's certificate and key: copy them to that host only (mvllmd --tls-cert,
  DIR/HOST.key   --tls-key). A host serves with them and dials its peers with them
  DIR/USER.pem   a user's certificate and key: give them to that user only (mvllmctl --tls-cert,
  DIR/USER.key   --tls-key). A user's certificate can never act as a host

\b
Keys are EC P-256, written with mode 0600; certificates are valid from 5 minutes ago (clocks drift).
Nothing is overwritten without --force. Names: 1 to 63 letters, digits, '.', '_', '-', not "ca".

\b
Exit status: 0 written, 1 could not write, 2 usage error (a bad name, no CA, the files exist).

\b
Examples:
  mvllmd certs ca --dir ~/fleet
  mvllmd certs host gpu-1 --address 10.0.0.2:7070 --address gpu-1.lan --dir ~/fleet
  mvllmd certs user alice --dir ~/fleet
"""

F = TypeVar("F", bound=Callable[..., Any])
DIRECTORY = click.Path(file_okay=False, path_type=Path)


@cli.group("certs", epilog=CERTS_EPILOG)
def certs_group() -> None:
    """The fleet's certificates: one CA signs a certificate for each host and each user (mutual TLS).

    Hosts talk gRPC to each other and to mvllmctl over mutual TLS. A daemon tells a peer from a user by
    its certificate: a host's serves and dials (serverAuth + clientAuth, URI mvllm://host/NAME); a
    user's only dials (clientAuth, URI mvllm://user/NAME).
    """


def _dir_option(help_text: str) -> Callable[[F], F]:
    return click.option("--dir", "directory", type=DIRECTORY, default=".", show_default=True, help=help_text)


def _days_option(default: int) -> Callable[[F], F]:
    return click.option("--days", type=click.IntRange(min=1), default=default, show_default=True,
                        help="Days the certificate is valid.")  # fmt: skip


CA_DIR = click.option("--ca-dir", type=DIRECTORY, help="Where ca.pem and ca.key are. [--dir]")
FORCE = click.option("--force", is_flag=True, help="Replace NAME.pem and NAME.key if they exist.")


@certs_group.command("ca")
@_dir_option("Where to write ca.pem and ca.key.")
@click.option("--name", default=certs.FLEET_NAME, show_default=True,
              help="The fleet's name: the CA's CN and O, and the O of every certificate it signs.")  # fmt: skip
@_days_option(3650)
@click.option("--force", is_flag=True, help="Replace ca.pem and ca.key (and so distrust all the old CA signed).")
def certs_ca_command(directory: Path, name: str, days: int, force: bool) -> None:
    """Make the fleet CA: DIR/ca.pem (for every host and user) and DIR/ca.key (keep it here)."""
    _wrote(certs.make_ca(directory, name, days=days, force=force))
    click.echo(f"next: mvllmd certs host NAME --address HOST:PORT --dir {directory}", err=True)


@certs_group.command("host")
@click.argument("name")
@click.option("--address", "addresses", multiple=True, required=True, metavar="ADDR",
              help="An address peers dial: the gRPC listener (10.0.0.2:7070, [fd00::2]:7070, gpu-1.lan:7070) "
                   "or the HTTP front door's URL; the port is dropped. Repeat for each.")  # fmt: skip
@_dir_option("Where to write NAME.pem and NAME.key.")
@CA_DIR
@_days_option(825)
@FORCE
def certs_host_command(
    name: str, addresses: tuple[str, ...], *, directory: Path, ca_dir: Path | None, days: int, force: bool
) -> None:
    """Make host NAME's certificate (serves and dials): DIR/NAME.pem and DIR/NAME.key, for that host only."""
    pair = certs.make_host(directory, name, list(addresses), days=days, force=force, ca_dir=ca_dir)
    _wrote(pair)
    ports = [port for a in addresses if "://" not in a for port in [certs.split_address(a)[1]] if port]
    ca = (ca_dir or directory) / certs.CA_FILE
    click.echo(
        f"next: mvllmd --tls-cert {pair.cert} --tls-key {pair.key} --tls-client-ca {ca} "
        f"--listen 0.0.0.0:{ports[0] if ports else 7070}\n"
        f"      on {name}: copy {pair.cert.name}, {pair.key.name} and {ca.name} there; ca.key stays here",
        err=True,
    )


@certs_group.command("user")
@click.argument("name")
@_dir_option("Where to write NAME.pem and NAME.key.")
@CA_DIR
@_days_option(825)
@FORCE
def certs_user_command(name: str, directory: Path, ca_dir: Path | None, days: int, force: bool) -> None:
    """Make user NAME's certificate for mvllmctl (dials only): DIR/NAME.pem and DIR/NAME.key."""
    pair = certs.make_user(directory, name, days=days, force=force, ca_dir=ca_dir)
    _wrote(pair)
    ca = (ca_dir or directory) / certs.CA_FILE
    click.echo(
        f"next: mvllmctl --tls-ca {ca} --tls-cert {pair.cert} --tls-key {pair.key} --address HOST:PORT info",
        err=True,
    )


def _wrote(pair: certs.Pair) -> None:
    for path in pair:
        click.echo(f"wrote {certs.describe(path)}")


def _setup_logging(level: str, journald: bool) -> None:
    # journald stamps each line itself; a terminal gets the time.
    fmt = "%(levelname)s %(name)s: %(message)s" if journald else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe is noise


GC_THRESHOLDS = (100_000, 20, 100)  # Python's defaults: (700, 10, 10)


def _quiet_collector() -> None:
    """Keep the cycle collector off the event loop's back: what is loaded by now (every module, gRPC,
    pyarrow) lives as long as the daemon, so no collection scans it again (gc.freeze); and the
    collections are rarer, most garbage being freed by its reference count the moment it is. At the
    defaults a collection of the older generations paused the loop for tens of ms: the front door's p99
    at saturation was 46 ms, 26 with these, in four alternating pairs (README, "Choices")."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status; errors become one line on stderr."""
    try:
        result = cli.main(args=argv, prog_name="mvllmd", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("mvllmd: interrupted", err=True)
        return EXIT_INTERRUPTED
    except errors.MvllmError as exc:
        click.echo(f"mvllmd: error: {exc}", err=True)
        return EXIT_USAGE if isinstance(exc, USAGE_ERRORS) else EXIT_FAILED
    return result if isinstance(result, int) else EXIT_OK


def main() -> None:
    sys.exit(run())
