"""Shared fixtures: real mvllmd processes on real unix sockets (with the sd_notify listener they report
to), and mvllm-sim servers, in-process on loopback or as processes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import aiohttp
import pytest

from mvllm_sim.cli import config_from, parser
from mvllm_sim.server import SimServer

from daemonkit import DaemonProcess, Spawn, clean_environment, start_daemon
from simkit import SimProcess, StartSim
from usermanager import UserManager, available, remove_stale_cgroups

# The longest modules (seconds, one test at a time, CI of 2026-12-04), run first: `pytest -n 2 --dist
# loadfile` hands out whole modules in order, and a long one handed out last leaves the other worker idle.
LONGEST_FIRST = ("jobs/test_job_service.py", "jobs/test_job_faults.py", "tune/test_tune_sim.py",  # 124, 98, 97
                 "fleet/test_fleet_jobs.py", "weights/test_weight_updates.py",  # 84, 81
                 "jobs/test_machine_faults.py", "instances/test_process_instances.py")  # 77, 55  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(f"tests/{name}")), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: every module's tests keep their order


AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")


@pytest.fixture(scope="session", autouse=True)
def _engines_share_the_cpu_fairly(request: pytest.FixtureRequest) -> Iterator[None]:
    """Scheduler autogroups off while real vLLM engines run (as root; restored after). With them on
    (one task group per session), a busy CPU engine in its own session took both cores of this
    2-core VM for 2-5 s at a time, in about half the runs of tests/fleet/test_fleet_vllm.py: every
    other process (mvllmd, the tests, even `vmstat`) stood still while the engine's three processes
    ran (a SCHED_FIFO sampler, 2026-12-05). With them off: no stall over 0.5 s in five runs. mvllmd
    cannot watch an engine it gets no CPU to read. README, "Development", says more."""
    engines = any(item.get_closest_marker("vllm") for item in request.session.items)
    try:
        was = AUTOGROUP.read_text().strip() if engines else ""
        if was == "1":
            AUTOGROUP.write_text("0")
    except OSError:  # not Linux, no such kernel option, or not root: the engines run as they are
        was = ""
    yield
    if was == "1":
        AUTOGROUP.write_text("1")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: a unix socket path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clean_env(short_tmp: Path) -> dict[str, str]:
    """An environment that points every default at the test's own directory, never at $HOME or /run."""
    return clean_environment(short_tmp)


@pytest.fixture
def spawn(short_tmp: Path, clean_env: dict[str, str]) -> Iterator[Spawn]:
    """Start mvllmd processes with `spawn(args, watchdog_usec=None, prefix=())`; each is stopped after the test."""
    started: list[DaemonProcess] = []

    def _spawn(args: Sequence[str], watchdog_usec: int | None = None, prefix: Sequence[str] = ()) -> DaemonProcess:
        started.append(start_daemon(short_tmp, clean_env, args, watchdog_usec, prefix))
        return started[-1]

    yield _spawn
    for proc in started:
        proc.stop()
        proc.notify.close()


@pytest.fixture
def daemon(short_tmp: Path, spawn: Spawn) -> DaemonProcess:
    """A running mvllmd with 2 CPU slots and 3 simulated GPUs on a socket of its own."""
    args = ["--listen", f"unix:{short_tmp}/mvllmd.sock", "--state-dir", str(short_tmp / "state")]
    return spawn([*args, "--cpu-slots", "2", "--sim-gpus", "3"])


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """`await start_sim("--time-scale", "0", ...)` -> (base URL, server), built from mvllm-sim's own flags."""
    servers: list[SimServer] = []

    async def _start(*args: str) -> tuple[str, SimServer]:
        server = SimServer(config_from(parser().parse_args(["--model", "sim", *args])))
        servers.append(server)
        host, port = await server.start("127.0.0.1", 0)
        return f"http://{host}:{port}", server

    yield _start
    for server in servers:
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
def sim_process() -> Iterator[Callable[..., SimProcess]]:
    started: list[SimProcess] = []

    def _start(*args: str) -> SimProcess:
        started.append(SimProcess(*args))
        return started[-1]

    yield _start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def user_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserManager]:
    """A real systemd user manager in a private mount namespace (tests/usermanager.py), one per module."""
    reason = available()
    if reason is not None:  # never a silent skip: CI must prove this on every run
        pytest.fail(f"cannot start a systemd user manager here: {reason}")
    remove_stale_cgroups()
    with UserManager(tmp_path_factory.mktemp("um") / "home") as um:
        yield um
