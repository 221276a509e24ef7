"""hostkit's emulated hosts: their addresses reach each other and the root namespace, their private
directories stay private, a link goes down and up, nothing is left after the block, and a real mvllmd
on one host answers mvllmctl from the root namespace."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import hostkit
from daemonkit import MVLLMCTL, MVLLMD
from hostkit import Fleet, Host

PORT = 8080
# Answers every connection with its host's name, then closes it.
SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    conn, _ = server.accept()
    conn.sendall(socket.gethostname().encode())
    conn.close()
"""
# Prints what the server at ADDR:PORT answers; exit status 1 if it cannot connect within TIMEOUT.
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as conn:
        print(conn.recv(100).decode())
except OSError as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")
"""


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    if reason := hostkit.available():
        pytest.skip(reason)
    with hostkit.emulated_hosts(3) as made:
        yield made


def serve(host: Host) -> None:
    """Start SERVER on `host` and wait until the root namespace gets its answer."""
    host.popen([sys.executable, "-c", SERVER, host.address, str(PORT)])
    deadline = time.monotonic() + 10
    while fetch_from_root(host.address) != host.name:
        assert time.monotonic() < deadline, f"no server on {host.name}"
        time.sleep(0.05)


def fetch_from_root(address: str, timeout: float = 1.0) -> str | None:
    try:
        with socket.create_connection((address, PORT), timeout=timeout) as conn:
            return conn.recv(100).decode()
    except OSError:
        return None


def fetch(client: Host, server: Host, timeout: float = 1.0) -> subprocess.CompletedProcess[str]:
    return client.run([sys.executable, "-c", CLIENT, server.address, str(PORT), str(timeout)], timeout=30)


def gone(pid: int) -> bool:
    """No such process, or a zombie (a killed grandchild that PID 1 has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_hosts_reach_each_other_and_the_root_namespace(hosts: list[Host]) -> None:
    assert [h.name for h in hosts] == ["host-1", "host-2", "host-3"]
    assert len({h.address for h in hosts}) == 3
    for host in hosts:
        serve(host)
    for client in hosts:
        for server in hosts:
            done = fetch(client, server)
            assert (done.returncode, done.stdout.strip()) == (0, server.name), (client.name, done.stderr)


def test_private_directory_is_seen_by_its_host_only(hosts: list[Host]) -> None:
    one, two, _ = hosts
    assert one.private == two.private
    marker = one.private / "only-on-host-1"
    assert one.run(["sh", "-c", f"echo one > {marker}"]).returncode == 0
    assert one.run(["cat", str(marker)]).stdout == "one\n"
    assert one.inside(marker).read_text() == "one\n"
    assert two.run(["test", "-e", str(marker)]).returncode == 1
    assert not two.inside(marker).exists()
    assert not marker.exists()
    assert list(one.private.iterdir()) == []  # the root namespace sees the empty mount point


def test_link_down_cuts_a_host_off_and_link_up_restores_it(hosts: list[Host]) -> None:
    one, two, three = hosts
    serve(one)
    serve(two)
    two.link_down()
    started = time.monotonic()
    for client, server in ((one, two), (two, one), (three, two)):
        done = fetch(client, server, timeout=0.5)
        assert done.returncode == 1, (client.name, server.name, done.stdout)
    assert time.monotonic() - started < 10
    assert fetch_from_root(two.address, timeout=0.5) is None
    assert fetch(three, one).stdout.strip() == "host-1"  # the others still talk
    two.link_up()
    deadline = time.monotonic() + 5  # the carrier comes back within a second (linkwatch)
    while (done := fetch(one, two)).returncode != 0:
        assert time.monotonic() < deadline, done.stderr
    assert done.stdout.strip() == "host-2"
    assert fetch(two, one).stdout.strip() == "host-1"


def test_nothing_is_left_after_the_block() -> None:
    if reason := hostkit.available():
        pytest.skip(reason)
    with Fleet(2) as fleet:
        one = fleet.hosts[0]
        names = [fleet.bridge, *(h.netns for h in fleet.hosts), *(h.veth for h in fleet.hosts)]
        base = fleet.base
        # A program, and a grandchild that left its process group: found by its network namespace.
        proc = one.popen(["sh", "-c", "setsid sleep 600 & exec sleep 600"])
        deadline = time.monotonic() + 10
        while len(pids := hostkit.ip("netns", "pids", one.netns).split()) < 3:
            assert time.monotonic() < deadline, pids
            time.sleep(0.05)
        holders = [h.holder_pid for h in fleet.hosts]
        assert proc.pid in [int(p) for p in pids]
    listed = hostkit.ip("netns", "list") + hostkit.ip("link", "show")
    assert [n for n in names if n in listed] == []
    assert all(gone(pid) for pid in [*map(int, pids), *holders])
    assert proc.returncode is not None
    assert not base.exists()


def test_a_crashed_run_is_cleaned_up_by_the_next() -> None:
    if reason := hostkit.available():
        pytest.skip(reason)
    # A run killed inside its block, with a program running on its host (its output not on our pipe).
    crash = (
        "import os, signal, subprocess, hostkit\n"
        "fleet = hostkit.Fleet(1)\n"
        "host = fleet.hosts[0]\n"
        "proc = host.popen(['sleep', '600'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(fleet.bridge, host.netns, host.veth, host.holder_pid, proc.pid, fleet.base, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(hostkit.__file__).parent))
    argv = [sys.executable, "-c", crash]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    bridge, netns, veth, holder, program, base = done.stdout.split()
    try:
        assert netns in hostkit.ip("netns", "list")  # left behind
        deadline = time.monotonic() + 10
        while not gone(int(holder)):  # died with its parent
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        hostkit.remove_stale()
    listed = hostkit.ip("netns", "list") + hostkit.ip("link", "show")
    assert [n for n in (bridge, netns, veth) if n in listed] == []
    assert gone(int(program))
    assert not Path(base).exists()


def test_mvllmd_on_an_emulated_host(hosts: list[Host], short_tmp: Path, clean_env: dict[str, str]) -> None:
    host = hosts[0]
    address = f"{host.address}:7070"
    args = ["--state-dir", f"{host.private}/state", "--listen", address, "--insecure-tcp", "--sim-gpus", "2",
            "--gpu-source", "none", "--http-listen", "none", "--unit-manager", "process"]  # fmt: skip
    log = short_tmp / "mvllmd.log"
    with log.open("wb") as stderr:
        daemon = host.popen([MVLLMD, *args], env=host.environment(), stderr=stderr)

    def ctl(*argv: str) -> subprocess.CompletedProcess[str]:
        cmd = [MVLLMCTL, "--address", address, "--timeout", "5", *argv]
        return subprocess.run(cmd, env=clean_env, capture_output=True, text=True, timeout=30, check=False)

    deadline = time.monotonic() + 30
    while (info := ctl("info", "--json")).returncode != 0:
        assert daemon.poll() is None, log.read_text()
        assert time.monotonic() < deadline, info.stderr + log.read_text()
        time.sleep(0.2)
    assert json.loads(info.stdout)["hostname"] == "host-1"
    devices = ctl("devices", "--json")
    assert devices.returncode == 0, devices.stderr
    kinds = [d["kind"] for d in json.loads(devices.stdout)["devices"]]
    assert kinds == ["DEVICE_KIND_SIM_GPU"] * 2, devices.stdout
    assert host.run(["test", "-d", f"{host.private}/state"]).returncode == 0  # its state is on host 1 only
    assert not (host.private / "state").exists()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, log.read_text()
