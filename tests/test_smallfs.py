"""tests/smallfs.py: tmpfs mounts in a private mount namespace fill up for real, and leave nothing behind."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smallfs import MountNamespace, available

pytestmark = pytest.mark.skipif(available() is not None, reason=f"smallfs: {available()}")

MIB = 1 << 20

# Writes argv[2] bytes to argv[1]; exits with the errno of the failure, 0 if it fit.
_WRITE = """
import os, sys
try:
    with open(sys.argv[1], "wb") as f:
        f.write(b"x" * int(sys.argv[2]))
except OSError as e:
    sys.exit(e.errno)
"""


def _write_inside(ns: MountNamespace, path: Path, size: int) -> int:
    return subprocess.run(
        ns.command([sys.executable, "-I", "-c", _WRITE, str(path), str(size)]), check=False
    ).returncode


def _gone(pid: int) -> bool:
    """True once *pid* no longer exists (or is only a zombie left for a foreign parent to reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_small_tmpfs_fills_up_inside_only(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    with MountNamespace() as ns:
        ns.mount_tmpfs(fs, "1M")
        st = os.statvfs(ns.inside(fs))
        assert st.f_blocks * st.f_frsize == MIB  # statvfs through /proc/PID/root sees the tmpfs

        ns.inside(fs / "hello").write_text("hi\n")
        assert os.listdir(fs) == []  # the host sees the bare mount point
        assert subprocess.run(ns.command(["cat", str(fs / "hello")]), capture_output=True, check=True).stdout == b"hi\n"

        assert _write_inside(ns, fs / "big", 2 * MIB) == errno.ENOSPC
        with pytest.raises(OSError) as e:
            ns.inside(fs / "big2").write_bytes(b"x" * (2 * MIB))
        assert e.value.errno == errno.ENOSPC
        for name in ("big", "big2"):
            ns.inside(fs / name).unlink()

        ns.resize(fs, "4M")
        assert _write_inside(ns, fs / "big", 2 * MIB) == 0
        assert ns.inside(fs / "big").stat().st_size == 2 * MIB
        with pytest.raises(RuntimeError):
            ns.resize(fs, "1M")  # below what is in use
    assert os.listdir(fs) == []


def test_fill_leaves_about_leave_bytes(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    with MountNamespace() as ns:
        ns.mount_tmpfs(fs, "1M")
        filler = ns.fill(fs, leave_bytes=64 * 1024)
        st = os.statvfs(ns.inside(fs))
        assert 64 * 1024 <= st.f_bavail * st.f_frsize < 64 * 1024 + st.f_frsize
        assert _write_inside(ns, fs / "fits", 64 * 1024) == 0
        assert _write_inside(ns, fs / "more", 8 * 1024) == errno.ENOSPC
        filler.unlink()
        assert _write_inside(ns, fs / "more", 512 * 1024) == 0

        assert ns.fill(fs).exists()
        assert os.statvfs(ns.inside(fs)).f_bavail == 0


def test_command_runs_in_place_in_the_current_directory(tmp_path: Path) -> None:
    with MountNamespace() as ns:
        ns.mount_tmpfs(tmp_path / "fs", "1M")
        proc = subprocess.Popen(ns.command(["sleep", "5"]))
        try:
            deadline = time.monotonic() + 2
            while os.path.realpath(f"/proc/{proc.pid}/exe") != os.path.realpath("/usr/bin/sleep"):
                assert time.monotonic() < deadline, "nsenter did not exec sleep in place"
                time.sleep(0.01)
            assert os.readlink(f"/proc/{proc.pid}/ns/mnt") == os.readlink(f"/proc/{ns.pid}/ns/mnt")
        finally:
            proc.kill()
            proc.wait()
        out = subprocess.run(ns.command(["pwd"]), capture_output=True, text=True, check=True).stdout
        assert out.strip() == os.getcwd()


def test_close_leaves_no_anchor_and_an_empty_dir(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    ns = MountNamespace()
    ns.mount_tmpfs(fs, "1M")
    ns.inside(fs / "f").write_text("x")
    pid = ns.pid
    ns.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert fs.is_dir()
    assert os.listdir(fs) == []
    ns.close()  # idempotent


def test_anchor_dies_with_the_test_process() -> None:
    code = "from smallfs import MountNamespace; ns = MountNamespace(); print(ns.pid, flush=True); input()"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    with subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            anchor = int(child.stdout.readline())
            assert not _gone(anchor)
        finally:
            child.kill()  # SIGKILL: no cleanup of its own
    deadline = time.monotonic() + 2
    while not _gone(anchor):
        assert time.monotonic() < deadline, f"anchor {anchor} outlived the process that made it"
        time.sleep(0.01)
