"""The launcher execs the engine its spec names, with the spec's environment and the log as its output;
the old module path (`-m mvllmd.launcher`, in units installed by earlier releases) still runs it; each
instance's engine makes its ZMQ sockets in a directory of its own, emptied at each start."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mvllmd.instances.spec import EngineKind, InstanceSpec, write_spec

ENGINE = "import os, sys; print(os.environ['MARK'], sys.argv[1:])"


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("module", ["mvllmd.instances.launcher", "mvllmd.launcher"])
def test_the_launcher_execs_the_engine_of_its_spec(tmp_path: Path, module: str) -> None:
    log = tmp_path / "instances" / "e-0.log"
    spec = InstanceSpec(name="e-0", engine=EngineKind.SIM, model="m", served_model_name="m", host="127.0.0.1",
                        port=1, tensor_parallel_size=1, devices=("sim-gpu:0",),
                        argv=(sys.executable, "-c", ENGINE, "a b"), env={"MARK": "x$y"}, log_path=str(log))  # fmt: skip
    write_spec(tmp_path, spec)
    done = run(module, str(tmp_path), "e-0")
    assert done.returncode == 0, done.stderr
    assert log.read_text() == "x$y ['a b']\n"


def test_the_launcher_says_what_is_wrong(tmp_path: Path) -> None:
    usage = run("mvllmd.instances.launcher")
    assert usage.returncode == 2
    assert "usage: python -m mvllmd.instances.launcher STATE_DIR NAME" in usage.stderr
    missing = run("mvllmd.instances.launcher", str(tmp_path), "nope-0")
    assert missing.returncode == 1
    assert "cannot read spec" in missing.stderr


IPC_ENGINE = (
    "import os; base = os.environ.get('VLLM_RPC_BASE_PATH'); "
    "print(base, sorted(os.listdir(base)) if base and os.path.isdir(base) else None)"
)


def ipc_spec(state_dir: Path, name: str = "e-0", **env: str) -> Path:
    """An engine that prints where vLLM would make its ZMQ sockets, and what is there; its log."""
    log = state_dir / "instances" / f"{name}.log"
    spec = InstanceSpec(name=name, engine=EngineKind.VLLM, model="m", served_model_name="m", host="127.0.0.1",
                        port=1, tensor_parallel_size=1, devices=("cpu-slot:0",),
                        argv=(sys.executable, "-c", IPC_ENGINE), env=env, log_path=str(log))  # fmt: skip
    write_spec(state_dir, spec)
    return log


def test_each_instance_has_its_own_socket_directory_emptied_at_each_start(short_tmp: Path) -> None:
    tmp_path = short_tmp  # a socket's path there fits the kernel's 107 bytes
    log = ipc_spec(tmp_path)
    own = tmp_path.resolve() / "ipc" / "e-0"
    own.mkdir(parents=True)
    (own / "0b7c1f9e-stale").write_text("")  # a socket the engine's last start left
    done = run("mvllmd.instances.launcher", str(tmp_path), "e-0")
    assert done.returncode == 0, done.stderr
    assert log.read_text() == f"{own} []\n"
    assert stat.S_IMODE(own.stat().st_mode) == 0o700


def test_a_long_state_directory_gets_a_short_socket_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60)
    log = ipc_spec(deep, name="a-long-instance-name-0")
    done = run("mvllmd.instances.launcher", str(deep), "a-long-instance-name-0")
    assert done.returncode == 0, done.stderr
    base = log.read_text().split()[0]
    assert Path(base).parent == Path(tempfile.gettempdir()) and Path(base).name.startswith("mvllm-ipc-")
    assert len(base) + 37 <= 107  # "/" and a uuid4, the name vLLM gives a socket there
    shutil.rmtree(base)


def test_the_socket_directory_is_never_a_link_nor_replaces_the_users_choice(short_tmp: Path) -> None:
    tmp_path = short_tmp
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("")
    (tmp_path / "ipc").mkdir()
    (tmp_path / "ipc" / "e-0").symlink_to(elsewhere)  # not this instance's own directory: not used
    log = ipc_spec(tmp_path)
    assert run("mvllmd.instances.launcher", str(tmp_path), "e-0").returncode == 0
    assert log.read_text() == "None None\n" and (elsewhere / "keep").exists()  # vLLM's default; nothing removed
    log = ipc_spec(tmp_path, name="e-1", VLLM_RPC_BASE_PATH=str(elsewhere))  # `launch --env` wins
    assert run("mvllmd.instances.launcher", str(tmp_path), "e-1").returncode == 0
    assert log.read_text() == f"{elsewhere} ['keep']\n"
