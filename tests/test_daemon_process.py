"""mvllmd as a real process on real sockets: start-up, sd_notify, socket safety, refusals, drain."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

from daemonkit import MVLLMCTL, DaemonProcess, Spawn, assert_short_error, run_mvllmd


def test_ready_status_and_socket_mode(daemon: DaemonProcess, short_tmp: Path) -> None:
    ready = next(m for m in daemon.notify.messages if "READY=1" in m)
    assert f"STATUS=serving on unix:{short_tmp}/mvllmd.sock" in ready.splitlines()
    mode = (short_tmp / "mvllmd.sock").stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660  # never world-readable or writable
    assert stat.S_IMODE((short_tmp / "state").stat().st_mode) == 0o700


def test_info_over_the_socket(daemon: DaemonProcess, short_tmp: Path) -> None:
    done = daemon.ctl("info", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["pid"] == daemon.proc.pid
    assert info["listen_addresses"] == [f"unix:{short_tmp}/mvllmd.sock"]
    assert info["state_dir"] == str(short_tmp / "state")
    assert info["unit_manager"] == "UNIT_MANAGER_PROCESS"  # no systemd manager answers from here
    assert info["under_systemd"] is True  # NOTIFY_SOCKET is set, as systemd sets it


def test_devices_lists_declared_kinds_never_as_gpus(daemon: DaemonProcess) -> None:
    done = daemon.ctl("devices", "--json")
    assert done.returncode == 0, done.stderr
    devices = json.loads(done.stdout)["devices"]
    kinds = [d["kind"] for d in devices]
    assert kinds.count("DEVICE_KIND_CPU_SLOT") == 2
    assert kinds.count("DEVICE_KIND_SIM_GPU") == 3
    assert "DEVICE_KIND_GPU" not in kinds  # this machine has no GPU, and declared kinds are not GPUs


def test_default_socket_under_xdg_runtime_dir(short_tmp: Path, clean_env: dict[str, str], spawn: Spawn) -> None:
    spawn(["--state-dir", str(short_tmp / "state")])
    socket_dir = Path(clean_env["XDG_RUNTIME_DIR"]) / "mvllmd"
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
    assert stat.S_ISSOCK((socket_dir / "mvllmd.sock").stat().st_mode)
    # mvllmctl finds the same default without being told.
    done = subprocess.run([MVLLMCTL, "info"], capture_output=True, text=True, env=clean_env, check=False)
    assert done.returncode == 0, done.stderr
    assert f"unix:{socket_dir}/mvllmd.sock" in done.stdout


def test_sigterm_says_stopping_and_cleans_up(daemon: DaemonProcess, short_tmp: Path, spawn: Spawn) -> None:
    assert daemon.stop() == 0
    messages = daemon.notify.wait_for("STOPPING=1", timeout=5)
    assert any("STOPPING=1" in m for m in messages)
    assert not (short_tmp / "mvllmd.sock").exists()
    # The locks died with the process: a new daemon may take the same socket and state at once.
    again = spawn(daemon.argv[1:])
    assert again.stop() == 0


def test_watchdog_pings(short_tmp: Path, spawn: Spawn) -> None:
    args = ["--listen", f"unix:{short_tmp}/w.sock", "--state-dir", str(short_tmp / "state")]
    daemon = spawn(args, watchdog_usec=400_000)  # pings every 0.2 s
    daemon.notify.wait_for("WATCHDOG=1", timeout=5)
    daemon.notify.messages.clear()
    daemon.notify.wait_for("WATCHDOG=1", timeout=5)  # and it keeps pinging
    assert daemon.proc.poll() is None


def test_second_daemon_on_the_same_socket_is_refused(daemon: DaemonProcess, short_tmp: Path) -> None:
    args = ["--listen", f"unix:{short_tmp}/mvllmd.sock", "--state-dir", str(short_tmp / "other-state")]
    done = run_mvllmd(args, daemon.env)
    assert_short_error(done, 1, f"another mvllmd (pid {daemon.proc.pid}) already uses socket unix:{short_tmp}")
    assert not (short_tmp / "other-state").exists()  # refused before it touched anything
    assert daemon.ctl("info").returncode == 0  # and the first one still serves on its socket


def test_second_daemon_on_the_same_state_dir_is_refused(daemon: DaemonProcess, short_tmp: Path) -> None:
    args = ["--listen", f"unix:{short_tmp}/other.sock", "--state-dir", str(short_tmp / "state")]
    done = run_mvllmd(args, daemon.env)
    assert_short_error(done, 1, "already uses the state directory")
    assert not (short_tmp / "other.sock").exists()  # nothing left half-bound


def test_second_daemon_on_the_same_tcp_port_is_refused(
    short_tmp: Path, clean_env: dict[str, str], spawn: Spawn
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = spawn(["--listen", f"127.0.0.1:{port}", "--state-dir", str(short_tmp / "a")])
    args = ["--listen", f"unix:{short_tmp}/b.sock", "--listen", f"127.0.0.1:{port}"]
    done = run_mvllmd([*args, "--state-dir", str(short_tmp / "b")], clean_env)
    assert_short_error(done, 2, f"cannot listen on 127.0.0.1:{port}: the port is in use")
    assert not (short_tmp / "b.sock").exists()  # the unix socket it bound first was released
    assert first.ctl("info").returncode == 0


def test_explicit_socket_in_a_missing_directory(short_tmp: Path, clean_env: dict[str, str]) -> None:
    args = ["--listen", f"unix:{short_tmp}/nowhere/m.sock", "--state-dir", str(short_tmp / "state")]
    done = run_mvllmd(args, clean_env)
    assert_short_error(done, 2, f"directory {short_tmp}/nowhere does not exist")
    assert not (short_tmp / "nowhere").exists()  # mvllmd creates no arbitrary directories
    assert not (short_tmp / "state").exists()


def test_path_that_is_not_a_socket_is_left_alone(short_tmp: Path, clean_env: dict[str, str]) -> None:
    precious = short_tmp / "data.txt"
    precious.write_text("keep me")
    done = run_mvllmd(["--listen", f"unix:{precious}", "--state-dir", str(short_tmp / "s")], clean_env)
    assert_short_error(done, 2, "exists and is not a socket")
    assert precious.read_text() == "keep me"


def test_stale_socket_of_a_killed_daemon_is_replaced(daemon: DaemonProcess, short_tmp: Path, spawn: Spawn) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    assert (short_tmp / "mvllmd.sock").exists()  # kill -9 leaves the socket file behind
    again = spawn(daemon.argv[1:])
    assert again.ctl("info").returncode == 0


def test_non_loopback_tcp_is_refused_without_insecure_tcp(short_tmp: Path, clean_env: dict[str, str]) -> None:
    done = run_mvllmd(["--listen", "0.0.0.0:7070", "--state-dir", str(short_tmp / "s")], clean_env)
    assert_short_error(done, 2, "refusing to listen on 0.0.0.0:7070", "--insecure-tcp")
    assert not (short_tmp / "s").exists()


def test_insecure_tcp_is_allowed_when_asked(short_tmp: Path, spawn: Spawn) -> None:
    args = ["--listen", "0.0.0.0:0", "--insecure-tcp", "--state-dir", str(short_tmp / "s")]
    daemon = spawn(args)
    port = daemon.tcp_port
    assert port > 0
    assert daemon.ctl("info", address=f"127.0.0.1:{port}").returncode == 0


def test_unknown_flag(clean_env: dict[str, str]) -> None:
    done = run_mvllmd(["--no-such-flag"], clean_env)
    assert_short_error(done, 2, "No such option")


def test_malformed_config(short_tmp: Path, clean_env: dict[str, str]) -> None:
    bad = short_tmp / "bad.toml"
    bad.write_text("[daemon]\nlisten = [unix:/x\n")
    done = run_mvllmd(["--config", str(bad)], clean_env)
    assert_short_error(done, 2, f"config file {bad} is not valid TOML")


def test_wrong_type_in_config(short_tmp: Path, clean_env: dict[str, str]) -> None:
    bad = short_tmp / "bad.toml"
    bad.write_text('[inventory]\ncpu_slots = "four"\n')
    done = run_mvllmd(["--config", str(bad)], clean_env)
    assert_short_error(done, 2, "[inventory] cpu_slots: expected an integer, got 'four'")


def test_unreadable_config(short_tmp: Path, clean_env: dict[str, str]) -> None:
    for path in (short_tmp / "missing.toml", short_tmp):  # no such file; a directory
        done = run_mvllmd(["--config", str(path)], clean_env)
        assert_short_error(done, 2, f"cannot read config file {path}")
    binary = short_tmp / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert_short_error(run_mvllmd(["--config", str(binary)], clean_env), 2, "is not UTF-8 text")


def test_version(clean_env: dict[str, str]) -> None:
    done = run_mvllmd(["--version"], clean_env)
    assert done.returncode == 0
    assert done.stdout.startswith("mvllmd, version ")


def test_umask_keeps_state_private(daemon: DaemonProcess, short_tmp: Path) -> None:
    lock = short_tmp / "state" / "mvllmd.lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert lock.read_text().strip() == str(daemon.proc.pid)
    assert os.access(lock, os.R_OK)


def test_socket_group(short_tmp: Path, spawn: Spawn) -> None:
    args = [
        "--listen",
        f"unix:{short_tmp}/g.sock",
        "--state-dir",
        str(short_tmp / "s"),
        "--socket-group",
        "nogroup",
    ]
    spawn(args)
    st = (short_tmp / "g.sock").stat()
    assert st.st_gid == 65534  # nogroup, as Debian numbers it
    assert stat.S_IMODE(st.st_mode) == 0o660
