"""Helpers for the simulator's tests (fixtures are in conftest.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mvllm_sim.server import SimServer

from daemonkit import free_port_range

MVLLM_SIM = str(Path(sys.executable).parent / "mvllm-sim")
StartSim = Callable[..., Awaitable[tuple[str, SimServer]]]


def free_port() -> int:
    """A free port for a simulator to bind, below the kernel's ephemeral range (daemonkit.free_port_range):
    one taken from that range could become any connection's source port before the simulator binds it."""
    return free_port_range(1)


class SimProcess:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [MVLLM_SIM, "--model", "sim", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.stderr_text = ""

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mvllm-sim exited {self.proc.returncode}: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("mvllm-sim did not open its port")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.stderr_text = self.proc.stderr.read()
            self.proc.stderr.close()


def completion_body(**extra: Any) -> dict[str, Any]:
    return {"model": "sim", "prompt": "The quick brown fox", "max_tokens": 12, **extra}
