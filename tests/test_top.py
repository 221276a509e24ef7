"""`mvllmctl top` against a real daemon: 4 simulated GPUs, sim instances, a running job, front-door
traffic. `--once --json` must show what ran; the live view is driven under a real terminal (a private
tmux server: keys sent, the pane captured); a daemon that goes away gets a banner, not a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mvllm.v1 import daemon_pb2 as pb
from mvllm.v1 import job_pb2
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.top import render
from mvllmd.inventory import DeviceKind, SimLoad, sim_gpu_usage
from mvllmd.overview import memory_share

from daemonkit import MVLLMCTL, DaemonProcess, Spawn, clean_environment, start_daemon
from jobkit import daemon_args, launch, submit, write_prompts

TMUX = shutil.which("tmux") or "/usr/bin/tmux"
GIB = 2**30
SLOW = ("--time-scale", "1", "--max-num-seqs", "16", "--gpu-memory-utilization", "0.5")  # 40 of 80 GiB
OK_REQUESTS = 5  # to the `other` model through the front door; then one the server refuses (400)
PROMPTS, SAMPLES = 400, 8  # 3,200 samples of at most 64 tokens, at 16 a server: a minute or more


@pytest.fixture(scope="module")
def busy() -> Iterator[tuple[DaemonProcess, str]]:
    """A daemon with 4 simulated GPUs; m-0 and m-1 (slow, half of a GPU's memory each) run a job, other-0
    (instant, vLLM's default 0.9) served OK_REQUESTS + 1 front-door requests. Yields it and the job's id."""
    tmp = Path(tempfile.mkdtemp(prefix="mv-top-", dir="/tmp"))
    daemon = start_daemon(tmp, clean_environment(tmp), daemon_args(tmp))
    try:
        launch(daemon, 2, *SLOW, model="m")
        launch(daemon, 1, "--time-scale", "0.001", model="other")
        data = write_prompts(tmp / "prompts.parquet", PROMPTS)
        job_id = submit(daemon, data, tmp / "out.parquet", "--model", "m", "-k", str(SAMPLES), "--max-tokens", "64")
        door = overview(daemon)["front_door"]["urls"][0]
        with httpx.Client(timeout=30) as client:
            for _ in range(OK_REQUESTS):
                body = {"model": "other", "prompt": "hello", "max_tokens": 4}
                assert client.post(f"{door}/v1/completions", json=body).status_code == 200
            assert client.post(f"{door}/v1/completions", json={"model": "other", "prompt": ""}).status_code == 400
        yield daemon, job_id
    finally:
        daemon.stop()
        daemon.notify.close()
        shutil.rmtree(tmp, ignore_errors=True)


def overview(daemon: DaemonProcess) -> dict[str, Any]:
    done = daemon.ctl("top", "--once", "--json")
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def until(daemon: DaemonProcess, holds: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
    """Snapshots until one satisfies `holds`; return it."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = overview(daemon)
        if holds(snapshot):
            return snapshot
        assert time.monotonic() < deadline, f"no snapshot did in {timeout}s; the last:\n{json.dumps(snapshot)}"
        time.sleep(0.3)


def test_once_json_shows_what_runs(busy: tuple[DaemonProcess, str]) -> None:
    daemon, job_id = busy

    def job_running(s: dict[str, Any]) -> bool:
        jobs = s["jobs"]
        return bool(jobs) and jobs[0]["state"] == "JOB_STATE_RUNNING" and int(jobs[0]["samples_done"]) > 0

    snapshot = until(daemon, job_running)
    gpus = {g["uuid"]: g for g in snapshot["gpus"] if g["kind"] == "DEVICE_KIND_SIM_GPU"}
    assert sorted(gpus) == [f"sim-gpu-{i}" for i in range(4)]
    placed = {g["uuid"]: (g["instances"], int(g["memory_used_bytes"]) / GIB) for g in gpus.values()}
    assert placed == {"sim-gpu-0": (["m-0"], 40.0), "sim-gpu-1": (["m-1"], 40.0), "sim-gpu-2": (["other-0"], 72.0),
                      "sim-gpu-3": ([], 0.0)}  # fmt: skip
    assert {int(g["memory_total_bytes"]) for g in gpus.values()} == {80 * GIB}

    servers = {s["name"]: s for s in snapshot["servers"]}
    assert list(servers) == ["m-0", "m-1", "other-0"]
    assert {(s["engine"], s["state"]) for s in servers.values()} == {("sim", "INSTANCE_STATE_READY")}
    assert [servers[n]["max_num_seqs"] for n in ("m-0", "m-1")] == [16, 16]
    assert {s["gauges"] for s in servers.values()} == {"GAUGE_SOURCE_ENDPOINT_TABLE"}  # the front door reads them
    assert servers["m-0"]["inflight"] + servers["m-1"]["inflight"] > 0
    # A request's finished choices count in flight until it returns (n=8 here), so mvllmd's count may pass a
    # server's places; what each server runs, by its own gauges, may not.
    assert all(servers[n]["running"] <= 16 for n in ("m-0", "m-1"))
    assert servers["other-0"]["inflight"] == 0

    (job,) = snapshot["jobs"]
    assert (job["id"], job["model"], int(job["samples_total"])) == (job_id, "m", PROMPTS * SAMPLES)
    assert 0 < int(job["samples_done"]) < PROMPTS * SAMPLES
    assert job["samples_per_second"] > 0 and job["tokens_per_second"] > 0 and job["eta_seconds"] > 0

    door = snapshot["front_door"]
    assert (door["requests_total"], door["errors_total"]) == (str(OK_REQUESTS + 1), "1")  # int64: strings
    assert door["statuses"] == [{"status": 200, "requests": str(OK_REQUESTS)}, {"status": 400, "requests": "1"}]
    assert door["urls"] == json.loads(daemon.ctl("info", "--json").stdout)["http_urls"]

    # Utilisation follows the sequences: a GPU whose instance runs some is busy; other-0's is idle.
    def busy_gpus(s: dict[str, Any]) -> bool:
        running = {x["name"]: x["running"] for x in s["servers"]}
        util = {g["uuid"]: g["utilization"] for g in s["gpus"]}
        return running["m-0"] > 0 and util["sim-gpu-0"] == 1.0 and util["sim-gpu-2"] == 0.0

    until(daemon, busy_gpus)


def test_once_json_prints_every_field(busy: tuple[DaemonProcess, str]) -> None:
    daemon, _ = busy
    snapshot = overview(daemon)
    idle = next(g for g in snapshot["gpus"] if g["uuid"] == "sim-gpu-3")
    assert idle["instances"] == [] and idle["utilization"] == 0.0  # defaults are printed, not left out
    assert set(snapshot) == {f.name for f in pb.GetOverviewResponse.DESCRIPTOR.fields}
    assert set(snapshot["servers"][0]) == {f.name for f in pb.OverviewServer.DESCRIPTOR.fields}


def test_once_prints_one_plain_frame(busy: tuple[DaemonProcess, str]) -> None:
    daemon, job_id = busy
    done = daemon.ctl("top", "--once")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for shown in ("sim-gpu:3", "m-0", "other-0", job_id, f"requests {OK_REQUESTS + 1}", "errors 1"):
        assert shown in text, text


class Tmux:
    """A private tmux server (its own socket name): only it is ever killed."""

    def __init__(self, env: dict[str, str]) -> None:
        self.name = f"mvllm-top-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.env = env

    def __call__(self, *args: str) -> str:
        done = subprocess.run([TMUX, "-L", self.name, *args], capture_output=True, text=True, env=self.env,
                              timeout=30, check=False)  # fmt: skip
        return done.stdout

    def start(self, command: str, width: int = 120, height: int = 40) -> None:
        done = subprocess.run([TMUX, "-L", self.name, "-f", "/dev/null", "new-session", "-d", "-x", str(width),
                               "-y", str(height), command], env=self.env, capture_output=True, text=True,
                              timeout=30, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr

    def screen(self) -> str:
        return self("capture-pane", "-p")

    def wait_for(self, *texts: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while not all(t in (screen := self.screen()) for t in texts):
            assert time.monotonic() < deadline, f"the pane never showed {texts}:\n{screen}"
            time.sleep(0.3)
        return screen

    def kill(self) -> None:
        subprocess.run([TMUX, "-L", self.name, "kill-server"], capture_output=True, env=self.env, timeout=30,
                       check=False)  # fmt: skip
        assert subprocess.run([TMUX, "-L", self.name, "has-session"], capture_output=True, env=self.env,
                              timeout=30, check=False).returncode != 0  # fmt: skip


@pytest.fixture
def tmux(busy: tuple[DaemonProcess, str]) -> Iterator[Tmux]:
    session = Tmux(busy[0].env)
    yield session
    session.kill()


def top_command(daemon: DaemonProcess, rc: Path, *args: str) -> str:
    """mvllmctl top in the pane; its exit status is written to `rc`, and the pane stays a moment after."""
    return f"{MVLLMCTL} --address {daemon.address} top {' '.join(args)}; echo $? > {rc}; sleep 60"


def wait_rc(rc: Path, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while not rc.exists() or not rc.read_text().strip():
        assert time.monotonic() < deadline, "mvllmctl top did not exit"
        time.sleep(0.1)
    return int(rc.read_text())


def test_live_view_in_a_terminal(busy: tuple[DaemonProcess, str], tmux: Tmux, tmp_path: Path) -> None:
    daemon, job_id = busy
    rc = tmp_path / "rc"
    tmux.start(top_command(daemon, rc, "--interval", "0.5"))
    screen = tmux.wait_for("sim-gpu:0", "sim-gpu:3", "m-0", "m-1", "other-0", job_id, "running", "/s (")
    lines = screen.splitlines()
    assert lines[0].startswith("mvllmd ") and "(q quits)" in lines[0]
    assert any(line.startswith("front door  http://127.0.0.1:") for line in lines)
    gpu_rows = [line.split() for line in lines if line.startswith("sim-gpu:")]
    assert [(r[0], r[3], r[4]) for r in gpu_rows] == [
        ("sim-gpu:0", "40.0/80.0", "m-0"), ("sim-gpu:1", "40.0/80.0", "m-1"),
        ("sim-gpu:2", "72.0/80.0", "other-0"), ("sim-gpu:3", "0.0/80.0", "-"),
    ]  # fmt: skip
    (job_row,) = [line for line in lines if line.startswith(job_id)]
    assert "running" in job_row and "/3,200" in job_row
    assert all(len(line) <= 120 for line in lines)
    tmux("send-keys", "q")
    assert wait_rc(rc) == 0
    assert "Traceback" not in tmux.screen()


def test_narrow_terminal_and_ctrl_c(busy: tuple[DaemonProcess, str], tmux: Tmux, tmp_path: Path) -> None:
    daemon, _ = busy
    rc = tmp_path / "rc"
    tmux.start(top_command(daemon, rc, "--interval", "0.5"), width=24, height=5)
    screen = tmux.wait_for("mvllmd ")
    assert all(len(line) <= 24 for line in screen.splitlines())
    tmux("resize-window", "-x", "2", "-y", "1")  # smaller still: nothing to draw on, nothing breaks
    time.sleep(1.5)
    tmux("resize-window", "-x", "100", "-y", "30")
    tmux.wait_for("sim-gpu:3")
    tmux("send-keys", "C-c")
    assert wait_rc(rc) == 0


def test_a_daemon_that_goes_away_gets_a_banner(spawn: Spawn, short_tmp: Path, tmp_path: Path) -> None:
    daemon = spawn(["--listen", f"unix:{short_tmp}/gone.sock", "--state-dir", str(short_tmp / "gone"),
                    "--sim-gpus", "1"])  # fmt: skip
    tmux = Tmux(daemon.env)
    rc = tmp_path / "rc"
    try:
        tmux.start(top_command(daemon, rc, "--interval", "0.3"))
        tmux.wait_for("sim-gpu:0", "no servers")
        daemon.stop()
        # The last frame stays under the banner; once the daemon has gone (its socket removed: while it stops
        # a call may first time out), the banner says it is not running.
        tmux.wait_for("NO ANSWER from mvllmd", "sim-gpu:0", "mvllmd is not running at")
        tmux("send-keys", "q")
        assert wait_rc(rc) == 0
    finally:
        tmux.kill()


def test_unreachable_and_no_terminal(clean_env: dict[str, str], short_tmp: Path, tmp_path: Path) -> None:
    address = f"unix:{short_tmp}/none.sock"

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [MVLLMCTL, "--address", address, *args]
        return subprocess.run(argv, capture_output=True, text=True, env=clean_env, timeout=60, check=False)

    for args in (("top", "--once"), ("top", "--once", "--json")):
        done = ctl(*args)
        assert done.returncode == ExitStatus.UNREACHABLE, (args, done.stderr)
        assert "mvllmd is not running at" in done.stderr and "Traceback" not in done.stderr
    assert ctl("top", "--json").returncode == ExitStatus.USAGE  # --json is one snapshot: --once
    no_terminal = ctl("top")
    assert no_terminal.returncode == ExitStatus.USAGE and "--once" in no_terminal.stderr
    # In a terminal, a daemon that cannot be reached at start is the usual one-line error, exit 3.
    tmux, rc = Tmux(clean_env), tmp_path / "rc"
    try:
        tmux.start(f"{MVLLMCTL} --address {address} top; echo $? > {rc}; sleep 60")
        assert wait_rc(rc) == ExitStatus.UNREACHABLE
        assert "mvllmd is not running at" in tmux.screen()
    finally:
        tmux.kill()


# --- one frame, without a daemon -------------------------------------------------------------------------


def snapshot(uptime: float, requests: int, errors: int, done: int) -> pb.GetOverviewResponse:
    return pb.GetOverviewResponse(
        uptime_seconds=uptime,
        version="0.1.0",
        hostname="h",
        gpus=[
            pb.OverviewGpu(
                kind=pb.DEVICE_KIND_SIM_GPU,
                index=0,
                uuid="sim-gpu-0",
                name="simulated GPU",
                utilization=1.0,
                memory_used_bytes=40 * GIB,
                memory_total_bytes=80 * GIB,
                instances=["a-very-long-instance-name-0"],
            )
        ],
        servers=[
            pb.OverviewServer(
                name="a-very-long-instance-name-0",
                engine="sim",
                running=3,
                waiting=1,
                gauges=pb.GAUGE_SOURCE_ENDPOINT_TABLE,
                url="http://127.0.0.1:8000",
            )
        ],
        jobs=[
            pb.OverviewJob(
                id="0123456789ab",
                state=job_pb2.JOB_STATE_RUNNING,
                samples_total=100,
                samples_done=done,
                samples_per_second=9.0,
                completion_tokens=done * 10,
            )
        ],
        front_door=pb.OverviewFrontDoor(urls=["http://127.0.0.1:7080"], requests_total=requests, errors_total=errors),
    )


def test_rates_come_from_two_snapshots() -> None:
    first, second = snapshot(10.0, 100, 1, 20), snapshot(12.0, 110, 3, 30)
    alone = "\n".join(line.text for line in render(first, None, None))
    assert "requests 100 " in alone and "9.0/s" in alone  # one snapshot: totals, and the job's average
    both = "\n".join(line.text for line in render(second, first, None))
    assert "requests 5.0/s (110 in all)" in both and "errors 1.0/s (3 in all)" in both
    assert "5.0/s" in next(line for line in both.splitlines() if line.startswith("0123456789ab"))  # 10 in 2 s
    restarted = "\n".join(line.text for line in render(snapshot(1.0, 0, 0, 0), second, None))
    assert "requests 0 " in restarted  # a daemon restart (uptime went back) gives no rate


@pytest.mark.parametrize("width", [1, 8, 40, 200])
def test_every_line_fits_the_width(width: int) -> None:
    lines = render(snapshot(12.0, 110, 3, 30), snapshot(10.0, 100, 1, 20), width, banner="x" * 300)
    assert all(len(line.text) <= width for line in lines)
    assert lines[1].style == "alert"


def test_simulated_gpus_follow_their_instances() -> None:
    loads = [SimLoad((0,), 0.5, running=3), SimLoad((1, 2), 0.9, running=0), SimLoad((0,), 0.7, running=0)]
    usage = sim_gpu_usage(4, loads)
    assert [(u.uuid, u.utilization, u.memory_used_bytes / GIB) for u in usage] == [
        ("sim-gpu-0", 1.0, 80.0),  # 0.5 + 0.7 reserved: at most all of it
        ("sim-gpu-1", 0.0, 72.0),  # a TP group reserves its share of each of its GPUs
        ("sim-gpu-2", 0.0, 72.0),
        ("sim-gpu-3", 0.0, 0.0),
    ]
    assert {(u.kind, u.memory_total_bytes) for u in usage} == {(DeviceKind.SIM_GPU, 80 * GIB)}


@pytest.mark.parametrize(
    ("argv", "share"),
    [((), 0.9), (("--gpu-memory-utilization", "0.5"), 0.5), (("--gpu-memory-utilization=0.3",), 0.3),
     (("--gpu-memory-utilization", "lots"), 0.9), (("--gpu-memory-utilization", "2"), 0.9)],
)  # fmt: skip
def test_memory_share_is_the_engines_flag(argv: tuple[str, ...], share: float) -> None:
    assert memory_share(("python", "-m", "mvllm_sim", *argv)) == share
