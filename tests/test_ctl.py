"""mvllmctl against a real daemon: tables, JSON, addresses, exit codes, and no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mvllmctl.client import _warn_on_version_skew, resolve_address
from mvllmctl.exit_codes import ExitStatus

from daemonkit import MVLLMCTL, DaemonProcess


def ctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MVLLMCTL, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_info_table(daemon: DaemonProcess, short_tmp: Path) -> None:
    done = daemon.ctl("info")
    assert done.returncode == 0, done.stderr
    rows = dict(line.split(None, 1) if "  " not in line else line.split("  ", 1) for line in done.stdout.splitlines())
    assert rows["version"].strip() == "0.1.0"
    assert rows["listening on"].strip() == f"unix:{short_tmp}/mvllmd.sock"
    assert rows["unit manager"].strip() == "process"


def test_devices_table(daemon: DaemonProcess) -> None:
    done = daemon.ctl("devices")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:4] == ["KIND", "INDEX", "UUID", "NAME"]
    assert [r.split()[0] for r in rows] == ["cpu-slot"] * 2 + ["sim-gpu"] * 3


def test_devices_json_prints_every_field(daemon: DaemonProcess) -> None:
    done = daemon.ctl("devices", "--kind", "gpu", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"devices": [], "gpu_source": "GPU_SOURCE_NONE", "failures": []}  # [] not omitted
    sim = json.loads(daemon.ctl("devices", "--kind", "sim-gpu", "--json").stdout)["devices"][0]
    assert set(sim) == {
        "kind",
        "index",
        "uuid",
        "name",
        "memory_total_bytes",
        "memory_free_bytes",
        "processes",
        "instance",
        "fleet_host",
    }
    assert sim["processes"] == []
    assert sim["index"] == 0  # a default value, printed all the same


def test_empty_device_list_explains_itself(daemon: DaemonProcess) -> None:
    done = daemon.ctl("devices", "--kind", "gpu")
    assert done.returncode == 0
    assert done.stdout == ""
    assert "no devices of kind gpu" in done.stderr


def test_unreachable_daemon(short_tmp: Path, clean_env: dict[str, str]) -> None:
    done = ctl("--address", f"unix:{short_tmp}/nobody.sock", "info", env=clean_env)
    assert done.returncode == ExitStatus.UNREACHABLE
    assert done.stderr.splitlines() == [
        f"mvllmctl: mvllmd is not running at unix:{short_tmp}/nobody.sock; start it with 'mvllmd' "
        "(or 'systemctl start mvllmd'), or point --address / MVLLM_ADDRESS at it"
    ]


def test_address_from_the_environment(daemon: DaemonProcess, clean_env: dict[str, str], short_tmp: Path) -> None:
    env = dict(clean_env, MVLLM_ADDRESS=f"{short_tmp}/mvllmd.sock")  # a bare path means unix:
    assert ctl("info", env=env).returncode == 0


def test_resolve_address_defaults(tmp_path: Path) -> None:
    assert resolve_address("127.0.0.1:7070", {"MVLLM_ADDRESS": "unix:/x"}) == "127.0.0.1:7070"
    assert resolve_address(None, {"MVLLM_ADDRESS": "unix:/x"}) == "unix:/x"
    # Nothing exists: the first candidate, so the error names where mvllmd would be.
    runtime = tmp_path / "run"
    assert resolve_address(None, {"XDG_RUNTIME_DIR": str(runtime)}) == f"unix:{runtime}/mvllmd/mvllmd.sock"
    assert resolve_address(None, {}) == "unix:/run/mvllmd/mvllmd.sock"


SUBMIT = ["submit", "-d", "in.parquet", "-o", "out.parquet"]


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--no-such-option"], ExitStatus.USAGE, "No such option"),
        (["frobnicate"], ExitStatus.USAGE, "No such command"),
        (["devices", "--kind", "tpu"], ExitStatus.USAGE, "Invalid value for '--kind'"),
        (["--timeout", "soon", "info"], ExitStatus.USAGE, "Invalid value for '--timeout'"),
        # A job spec is checked (mvllm.jobs.validate) before mvllmd is asked, in the daemon's words.
        ([*SUBMIT, "--max-tokens", "0"], ExitStatus.USAGE, "mvllmctl: --max-tokens must be 1 or more, got 0"),
        ([*SUBMIT, "-k", "0"], ExitStatus.USAGE, "mvllmctl: --num-samples must be from 1 to 65535, got 0"),
        ([*SUBMIT, "--top-p", "0"], ExitStatus.USAGE, "mvllmctl: --top-p must be above 0 and at most 1, got 0"),
        ([*SUBMIT, "--extra-body", "[1]"], ExitStatus.USAGE, "mvllmctl: --extra-body must be a JSON object"),
        ([*SUBMIT, "--extra-body", "{"], ExitStatus.USAGE, "mvllmctl: --extra-body is not valid JSON"),
        ([*SUBMIT, "--api-key", "k"], ExitStatus.USAGE, "mvllmctl: --api-key is for --endpoints servers"),
    ],
)
def test_usage_errors(clean_env: dict[str, str], args: list[str], code: int, fragment: str) -> None:
    done = ctl(*args, env=clean_env)
    assert done.returncode == code
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr


def test_the_cli_imports_nothing_of_the_daemon() -> None:
    code = "import sys, mvllmctl.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'mvllmd', 'mvllm_sim'}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_version_and_help(clean_env: dict[str, str]) -> None:
    assert ctl("--version", env=clean_env).stdout.startswith("mvllmctl, version 0.1.0")
    for args in (["--help"], ["info", "--help"], ["devices", "--help"]):
        done = ctl(*args, env=clean_env)
        assert done.returncode == 0
        assert "Usage: mvllmctl" in done.stdout
    assert "3    mvllmd is unreachable" in ctl("--help", env=clean_env).stdout


def test_shell_completion(clean_env: dict[str, str]) -> None:
    script = ctl("completion", "bash", env=clean_env)
    assert script.returncode == 0
    assert "_MVLLMCTL_COMPLETE" in script.stdout
    # Ask the completion machinery itself, as bash would.
    env = dict(clean_env, _MVLLMCTL_COMPLETE="bash_complete", COMP_WORDS="mvllmctl dev", COMP_CWORD="1")
    assert "plain,devices" in ctl(env=env).stdout.splitlines()


def test_version_skew_warning(capsys: pytest.CaptureFixture[str]) -> None:
    _warn_on_version_skew({"mvllm-version": "0.0.1"})
    assert "warning: mvllmctl 0.1.0 is talking to mvllmd 0.0.1" in capsys.readouterr().err
    _warn_on_version_skew({"mvllm-version": "0.1.0"})
    assert capsys.readouterr().err == ""
