"""A fleet of real mvllmd daemons on emulated hosts (hostkit): one per host, each with simulated GPUs,
its own state on its own file system, mutual TLS with certificates made by `mvllmd certs`.

Each daemon listens on its host's address (gRPC with mutual TLS, and its HTTP listener with TLS: the
per-instance routes), and also on a unix socket in the test's shared directory, by which the test
drives it as a plain DaemonProcess (jobkit's helpers work unchanged). Host 1 is the coordinator.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hostkit
from daemonkit import MVLLMCTL, MVLLMD, DaemonProcess, start_daemon, wait_for
from hostkit import Host, ip

GRPC_PORT = 7070
HTTP_PORT = 7080


def make_pki(folder: Path, hosts: Sequence[Host]) -> Path:
    """The fleet CA, a certificate for each host (its name and address), and one for the test's user."""
    folder.mkdir()

    def certs(*args: str) -> None:
        done = subprocess.run([MVLLMD, "certs", *args, "--dir", str(folder)], capture_output=True, text=True,
                              check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr

    certs("ca")
    for host in hosts:
        certs("host", host.name, "--address", host.address)
    certs("user", "tester")
    return folder


@dataclass
class FleetDaemon:
    host: Host
    pki: Path
    tmp: Path
    extra: list[str] = field(default_factory=list)
    daemon: DaemonProcess | None = None
    env: dict[str, str] = field(default_factory=dict)  # made at the first start, kept for the next
    cert: str = ""  # its certificate and key, pki/CERT.pem and .key, when not the host's own (e.g. "rogue/host-3")

    @property
    def address(self) -> str:
        """Its gRPC address on the fleet's network."""
        return f"{self.host.address}:{GRPC_PORT}"

    @property
    def http(self) -> str:
        return f"https://{self.host.address}:{HTTP_PORT}"

    def args(self) -> list[str]:
        name, pki = self.host.name, self.pki
        cert = self.cert or name
        return ["--listen", f"unix:{self.tmp}/{name}.sock", "--listen", self.address,
                "--tls-cert", f"{pki}/{cert}.pem", "--tls-key", f"{pki}/{cert}.key", "--tls-client-ca", f"{pki}/ca.pem",
                "--http-listen", self.http, "--state-dir", f"{self.host.private}/state", "--sim-gpus", "2",
                "--gpu-source", "none", "--unit-manager", "process", "--probe-interval", "0.2",
                *self.extra]  # fmt: skip

    def start(self) -> DaemonProcess:
        self.env = self.env or self.host.environment()
        if self.daemon is not None:
            self.daemon.notify.close()
        self.daemon = start_daemon(self.tmp, self.env, self.args(), prefix=self.host.command([]))
        return self.daemon

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """mvllmctl from the test's namespace, over the daemon's unix socket."""
        assert self.daemon is not None
        return self.daemon.ctl(*args, timeout=timeout)

    def remote_ctl(self, *args: str, cert: str = "tester", timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """mvllmctl over the fleet's network: TCP and mutual TLS, with the certificate `cert`."""
        pki = self.pki
        argv = [MVLLMCTL, "--address", self.address, "--tls-ca", f"{pki}/ca.pem", "--tls-cert", f"{pki}/{cert}.pem",
                "--tls-key", f"{pki}/{cert}.key", *args]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MVLLM_")}
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)

    def stop(self) -> None:
        if self.daemon is not None:
            if self.daemon.proc.poll() is None:
                self.daemon.stop()
            self.daemon.notify.close()

    def kill_host(self) -> None:
        """kill -9 the daemon and every process on its host (its engines), as a host that dies would."""
        assert self.daemon is not None
        for pid in ip("netns", "pids", self.host.netns).split():
            if int(pid) != self.host.holder_pid:
                os.kill(int(pid), signal.SIGKILL)
        self.daemon.proc.wait(30)


@contextlib.contextmanager
def coordinated(tmp: Path, count: int, extra: dict[int, list[str]] | None = None) -> Iterator[list[FleetDaemon]]:
    """`count` emulated hosts, each with its daemon (more flags for some: `extra`, by index), host 1 the
    coordinator with every other host as its peer; started peers first, until host 1 reaches them all."""
    with hostkit.Fleet(count) as hosts:
        pki = make_pki(tmp / "pki", hosts.hosts)
        daemons = [FleetDaemon(h, pki, tmp) for h in hosts.hosts]
        daemons[0].extra = [f"--fleet-host={d.host.name}={d.address}" for d in daemons[1:]]
        for index, flags in (extra or {}).items():
            daemons[index].extra += flags
        try:
            for daemon in reversed(daemons):
                daemon.start()

            def reached() -> bool:
                listed = json.loads(daemons[0].ctl("hosts", "--json").stdout or "{}").get("hosts", [])
                return len(listed) == count and all(h["reachable"] for h in listed)  # host 1 itself too

            wait_for(reached, timeout=30)
            yield daemons
        finally:
            for daemon in daemons:
                daemon.stop()
