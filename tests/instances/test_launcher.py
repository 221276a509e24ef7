"""The launcher execs the engine its spec names, with the spec's environment and the log as its output;
the old module path (`-m mvllmd.launcher`, in units installed by earlier releases) still runs it."""

from __future__ import annotations

import subprocess
import sys
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
