"""mvllmd.service under a real systemd user manager (tests/usermanager.py has the recipe and why)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mvllmd.instances.install import render, render_text, systemd_quote

from usermanager import UserManager

pytestmark = pytest.mark.systemd
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def manager(user_manager: UserManager) -> UserManager:
    return user_manager


def test_installed_unit_reaches_running_and_stops_cleanly(manager: UserManager, tmp_path: Path) -> None:
    # A config path full of what systemd would otherwise expand or split: $, %, quotes, spaces.
    config = tmp_path / 'my cfg $HOME %h "q".toml'
    config.write_text('[inventory]\nsim_gpus = 2\n[http]\nlisten = ["http://127.0.0.1:0"]\n')
    installed = manager.run([str(BIN / "mvllmd"), "install-units", "--user", "--runtime", "--config", str(config)])
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout == f"installed {manager.unit_dir}/mvllmd.service\n"

    started = manager.systemctl("start", "mvllmd")  # Type=notify: returns once READY=1 arrived
    assert started.returncode == 0, manager.log()
    state = _show(manager, "ActiveState", "SubState", "Type")
    assert state == {"ActiveState": "active", "SubState": "running", "Type": "notify"}, manager.log()

    done = manager.run([str(BIN / "mvllmctl"), "info", "--json"])  # the default socket, found by itself
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["listen_addresses"] == [f"unix:{manager.runtime_dir}/mvllmd/mvllmd.sock"]
    assert info["under_systemd"] is True
    assert info["unit_manager"] == "UNIT_MANAGER_SYSTEMD_USER"  # auto found the manager that answers
    assert info["state_dir"] == str(manager.state_dir / "mvllmd")  # StateDirectory=, not the real home
    devices = json.loads(manager.run([str(BIN / "mvllmctl"), "devices", "--json"]).stdout)["devices"]
    assert len(devices) == 2  # the odd config path reached mvllmd intact

    stopped = manager.systemctl("stop", "mvllmd")
    assert stopped.returncode == 0
    result = _show(manager, "ActiveState", "Result", "ExecMainStatus")
    assert result == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, manager.log()
    assert not manager.host_path(manager.runtime_dir / "mvllmd" / "mvllmd.sock").exists()
    assert "stopping: refusing new calls" in manager.log()


def test_systemd_analyze_verify(manager: UserManager) -> None:
    path = manager.write_file(
        manager.unit_dir / "mvllmd-verify.service", render("mvllmd.service", [str(BIN / "mvllmd")])
    )
    done = manager.run(["systemd-analyze", "--user", "verify", str(path)])
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # no warnings either


def test_instance_template_verifies(manager: UserManager, tmp_path: Path) -> None:
    fields = {"@PYTHON@": systemd_quote(sys.executable), "@STATE_DIR@": systemd_quote(str(tmp_path / "state dir"))}
    manager.write_file(manager.unit_dir / "mvllm-instances.target", render_text("mvllm-instances.target", {}))
    path = manager.write_file(
        manager.unit_dir / "mvllm-instance@verify.service", render_text("mvllm-instance@.service", fields)
    )
    done = manager.run(["systemd-analyze", "--user", "verify", str(path)])
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_exec_start_quoting_round_trips(manager: UserManager, tmp_path: Path) -> None:
    # The process systemd starts must get exactly the words we wrote, whatever they hold.
    out = tmp_path / "argv.json"
    code = f"import json, sys; open({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))"
    words = [
        "plain",
        "with space",
        "dollar $HOME ${HOME}",
        "percent %h %%",
        'quote " and \\ back',
        "semi;colon",
    ]
    argv = [sys.executable, "-c", code, *words]
    manager.write_unit("quoting.service", f"[Service]\nType=oneshot\nExecStart={' '.join(map(systemd_quote, argv))}\n")
    done = manager.systemctl("start", "quoting")
    assert done.returncode == 0, manager.log()
    assert json.loads(out.read_text()) == words


def _show(manager: UserManager, *names: str) -> dict[str, str]:
    out = manager.systemctl("show", "-p", ",".join(names), "mvllmd").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if line)
