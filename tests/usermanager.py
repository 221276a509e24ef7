"""Run a real systemd *user* manager for tests, in a private mount namespace.

Recipe (measured on Debian 12 / systemd 252, as root, PID 1 not systemd)::

    unshare --mount --propagation private  # then, inside:
    mount -t tmpfs tmpfs /run
    mkdir -p /run/systemd/system /run/user/0 && chmod 700 /run/user/0
    XDG_RUNTIME_DIR=/run/user/0 HOME=<temp dir> exec /usr/lib/systemd/systemd --user

plus the steps below.  Why it looks like this:

* Only the *user* manager is ever started.  Never boot systemd as PID 1
  (``unshare --pid`` with systemd as init, ``systemd --system``): on a shared
  machine its boot services wiped /tmp.
* ``systemd --user`` refuses to start unless ``/run/systemd/system`` exists
  (its "booted with systemd" test).  A private tmpfs on /run, in a private
  mount namespace, provides that marker and ``XDG_RUNTIME_DIR=/run/user/0``
  without touching the host's /run.  The host cannot see that tmpfs by its
  path: tests reach it through ``/proc/<manager pid>/root/run/...``
  (:meth:`UserManager.host_path`, :meth:`~UserManager.read_file`,
  :meth:`~UserManager.write_file`) or run commands inside with
  ``nsenter --target <pid> --mount`` (:meth:`UserManager.run`).
* cgroups are NOT namespaced by this.  A user manager takes the cgroup it
  starts in as its root, creates ``init.scope``/``app.slice`` below it and
  migrates every process of that cgroup into its ``init.scope``: started from
  the root cgroup it moved PID 1 and all other processes of the machine.  So
  the launcher first moves itself into a fresh cgroup ``<own>/mvllmd-test-<id>``
  in the hierarchies systemd tracks processes in (the cgroup2 tree - which
  systemd uses even on hybrid hosts - and ``name=systemd``), checks that it
  took, and only then execs systemd.  :meth:`UserManager.stop` SIGKILLs
  whatever is still in that subtree (only the manager and its units can be)
  and removes the directories.  If the test process is killed, the empty
  directories stay behind: :func:`remove_stale_cgroups` clears them.
* Root units with ProtectHome=, ProtectKernelTunables=, ProtectKernelLogs=,
  ... bind-mount ``/run/systemd/inaccessible/*``, which PID 1 creates at boot;
  on the fresh /run they are missing (the unit fails with 226/NAMESPACE), so
  the launcher creates them.
* The manager and the units' exec helper log to ``/dev/console`` (there is no
  journal), and only when it is a tty.  A raw pty slave is bind-mounted there
  and its output copied into :meth:`UserManager.log`; a drop-in in
  ``/run/systemd/user.conf.d/`` sets ``DefaultStandardOutput=inherit`` and
  ``DefaultStandardError=inherit`` so the units' own output lands there too
  (a unit that sets ``StandardOutput=journal`` has it discarded).
* The manager gets its own ``HOME`` and a minimal environment without
  ``XDG_*`` (except ``XDG_RUNTIME_DIR``), so user-unit directories resolve
  inside that HOME and tests never write into the real home directory.  With
  systemd 252, ``StateDirectory=NAME`` is ``$HOME/.config/NAME`` (252 maps it
  to ``$XDG_CONFIG_HOME``; later releases use ``$HOME/.local/state``; ask
  :attr:`UserManager.state_dir`), ``RuntimeDirectory=NAME`` is
  ``/run/user/0/NAME`` inside the namespace.
* The launcher runs under ``setpriv --pdeathsig TERM``: if the test process
  dies without :meth:`UserManager.stop`, the manager gets SIGTERM, on which a
  user manager starts ``exit.target`` (stops its units) and exits.
* Only processes started here are ever signalled, by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tty
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

SYSTEMD = "/usr/lib/systemd/systemd"
RUNTIME_DIR = Path("/run/user/0")
CGROUP_PREFIX = "mvllmd-test-"

_MANAGER_CONF = """\
[Manager]
DefaultStandardOutput=inherit
DefaultStandardError=inherit
DefaultTimeoutStartSec=30s
DefaultTimeoutStopSec=10s
"""

# Runs as `python -I -c _LAUNCHER RUNTIME_DIR CONF SYSTEMD CONSOLE [PROCS EXPECT]...`
# inside the new mount namespace and ends by exec-ing `systemd --user`.
_LAUNCHER = r"""
import os, stat, subprocess, sys

runtime_dir, conf, systemd, console, *joins = sys.argv[1:]

# 1. Leave the caller's cgroup: join our own in every tracking hierarchy and
#    check that it took, or systemd would migrate our cgroup-mates.
for procs, expect in zip(joins[0::2], joins[1::2]):
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
    with open("/proc/self/cgroup") as f:
        if expect not in f.read():
            sys.exit(f"usermanager launcher: {expect!r} not in /proc/self/cgroup")

# 2. Private /run: the "booted with systemd" marker, XDG_RUNTIME_DIR, config.
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"], check=True)
os.makedirs("/run/systemd/system")
os.makedirs("/run/systemd/user.conf.d")
with open("/run/systemd/user.conf.d/50-tests.conf", "w") as f:
    f.write(conf)
os.makedirs(runtime_dir)
os.chmod(runtime_dir, 0o700)

# 3. The nodes PID 1 creates at boot; a root user manager bind-mounts them
#    for ProtectHome=, ProtectKernelTunables=, ProtectKernelLogs=, ...
inaccessible = "/run/systemd/inaccessible"
os.mkdir(inaccessible, 0o755)
os.mkdir(inaccessible + "/dir", 0)
os.close(os.open(inaccessible + "/reg", os.O_CREAT | os.O_WRONLY, 0))
os.mknod(inaccessible + "/fifo", stat.S_IFIFO)
os.mknod(inaccessible + "/sock", stat.S_IFSOCK)
os.mknod(inaccessible + "/chr", stat.S_IFCHR, os.makedev(0, 0))
os.mknod(inaccessible + "/blk", stat.S_IFBLK, os.makedev(0, 0))
for name in os.listdir(inaccessible):
    os.chmod(inaccessible + "/" + name, 0)

# 4. systemd and its exec children log to /dev/console, and only if it is a
#    tty: put the pty slave that the test process reads there.
if console:
    subprocess.run(["mount", "--bind", console, "/dev/console"], check=True)

os.execv(systemd, [systemd, "--user", "--log-target=console", "--log-color=no", "--log-time=yes"])
"""


@dataclass(frozen=True)
class _Hierarchy:
    mount_point: Path
    mount_root: str
    fstype: str  # "cgroup" or "cgroup2"
    options: frozenset[str]  # super options, e.g. {"rw", "name=systemd"}

    def directory(self, cgroup_path: str) -> Path | None:
        """Directory of *cgroup_path* in this hierarchy, if it is visible."""
        root = self.mount_root.rstrip("/")
        if cgroup_path != root and not cgroup_path.startswith(root + "/"):
            return None
        rel = cgroup_path[len(root) :].lstrip("/")
        return self.mount_point / rel if rel else self.mount_point


def _cgroup_hierarchies() -> list[_Hierarchy]:
    result = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype = fields[sep + 1]
        if fstype in ("cgroup", "cgroup2"):
            result.append(
                _Hierarchy(
                    mount_point=Path(fields[4].replace("\\040", " ")),
                    mount_root=fields[3],
                    fstype=fstype,
                    options=frozenset(fields[sep + 3].split(",")),
                )
            )
    return result


def _own_cgroups() -> dict[str, str]:
    """Our cgroup paths, keyed by controller list ("" for cgroup2)."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    return own


def _tracking_hierarchies() -> tuple[str, list[tuple[_Hierarchy, str]]]:
    """Where systemd tracks processes: (base path, [(hierarchy, cgroup.procs line)]).

    systemd (since v233) tracks processes in the cgroup2 tree whenever one is
    mounted at /sys/fs/cgroup (unified) or /sys/fs/cgroup/unified (hybrid),
    and mirrors that path into the ``name=systemd`` v1 hierarchy if there is
    one; without cgroup2 it tracks in ``name=systemd``.  The manager must be
    alone in its cgroup in *all* of these, or it migrates its cgroup-mates
    (PID 1 included, when that cgroup is the root) into its init.scope.
    """
    own = _own_cgroups()
    hierarchies = _cgroup_hierarchies()
    v2 = [
        h
        for h in hierarchies
        if h.fstype == "cgroup2" and h.mount_point in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
    ]
    named = [h for h in hierarchies if h.fstype == "cgroup" and "name=systemd" in h.options]
    result: list[tuple[_Hierarchy, str]] = []
    if v2 and "" in own:
        base = own[""]
        result.append((v2[0], "0::"))
        if named and "name=systemd" in own:
            result.append((named[0], ":name=systemd:"))
    elif named and "name=systemd" in own:
        base = own["name=systemd"]
        result.append((named[0], ":name=systemd:"))
    else:
        raise RuntimeError(
            "no cgroup2 or name=systemd hierarchy found; refusing to start a user "
            "manager that could migrate foreign processes"
        )
    return base, result


def _cgroup_pids(directory: Path) -> set[int]:
    pids: set[int] = set()
    for dirpath, _, filenames in os.walk(directory):
        if "cgroup.procs" in filenames:
            try:
                text = (Path(dirpath) / "cgroup.procs").read_text()
            except OSError:
                continue
            pids.update(int(p) for p in text.split())
    return pids


def _rmdir_tree(directory: Path) -> bool:
    """rmdir a cgroup directory bottom-up; True if it is gone."""
    if not directory.exists():
        return True
    for dirpath, _, _ in os.walk(directory, topdown=False):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            pass
        except OSError:
            return False
    return not directory.exists()


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class UserManager:
    """A systemd user manager in a private mount namespace (tmpfs on /run)."""

    def __init__(self, home: Path, *, extra_env: Mapping[str, str] | None = None) -> None:
        self.home = Path(home).absolute()
        self._extra_env = dict(extra_env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._final_log = ""
        self._cgroup_path: str | None = None
        self._console_reader: subprocess.Popen[bytes] | None = None
        self._console_slave: int | None = None
        self._hierarchies: list[_Hierarchy] = []
        self._state_dir: Path | None = None
        self.start_duration: float | None = None
        """Seconds the last :meth:`start` took."""

    # -- paths -------------------------------------------------------------

    @property
    def pid(self) -> int:
        """PID of the ``systemd --user`` process (the namespace anchor)."""
        if self._proc is None:
            raise RuntimeError("user manager not started")
        return self._proc.pid

    @property
    def runtime_dir(self) -> Path:
        """``XDG_RUNTIME_DIR`` as seen inside the namespace (/run/user/0)."""
        return RUNTIME_DIR

    @property
    def unit_dir(self) -> Path:
        """Transient unit search path (inside the namespace)."""
        return self.runtime_dir / "systemd" / "user"

    @property
    def state_dir(self) -> Path:
        """Base of user units' ``StateDirectory=`` (a host path under :attr:`home`).

        Asked from the manager once (a transient unit): ``$HOME/.config`` with
        systemd 252, ``$HOME/.local/state`` with later releases.
        """
        if self._state_dir is None:
            probe = "usermanager-state-probe"
            argv = [
                "systemd-run", "--user", "--wait", "--pipe", "--quiet", "--collect",
                "-p", f"StateDirectory={probe}", "printenv", "STATE_DIRECTORY",
            ]  # fmt: skip
            res = self.run(argv, check=True)
            path = Path(res.stdout.strip())
            if path.name != probe:
                raise RuntimeError(f"unexpected STATE_DIRECTORY: {res.stdout!r}")
            path.rmdir()
            self._state_dir = path.parent
        return self._state_dir

    @property
    def cgroup_path(self) -> str | None:
        """The manager's own cgroup (path in the tracking hierarchy)."""
        return self._cgroup_path

    def host_path(self, path: Path | str) -> Path:
        """Path under which the test process sees *path* of the namespace.

        Only valid while the manager runs.  Absolute symlinks below it resolve
        against the host root, not the namespace.
        """
        p = Path(path)
        if not p.is_absolute():
            raise ValueError(f"not an absolute path: {p}")
        return Path(f"/proc/{self.pid}/root") / p.relative_to("/")

    # -- environment and commands -------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment for commands run inside (and for the manager)."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": str(self.home),
            "USER": "root",
            "LOGNAME": "root",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
        }
        env.update(self._extra_env)
        return env

    def _argv(self, argv: Sequence[str], cwd: Path | str | None) -> list[str]:
        # nsenter would otherwise start the command in / of the namespace.
        wd = os.fspath(cwd) if cwd is not None else os.getcwd()
        return ["nsenter", f"--target={self.pid}", "--mount", f"--wd={wd}", "--", *argv]

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        full = self.env()
        if env is not None:
            full.update(env)
        return full

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        cwd: Path | str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* inside the mount namespace, capturing text output.

        *env* is merged over :meth:`env`; *cwd* defaults to the caller's
        working directory; stdin is *input* or /dev/null.  With
        ``check=True`` a failure raises ``subprocess.CalledProcessError``
        (stdout/stderr attached).
        """
        if input is None:
            input = ""
        return subprocess.run(
            self._argv(argv, cwd),
            env=self._env(env),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[str]:
        """Start *argv* inside the namespace; text mode, other kwargs go to Popen.

        The caller owns the returned process (wait for it or kill it).
        """
        return subprocess.Popen(self._argv(argv, cwd), env=self._env(env), text=True, **kwargs)

    def systemctl(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``systemctl --user --no-pager ARGS`` inside the namespace."""
        return self.run(["systemctl", "--user", "--no-pager", *args], check=check, timeout=timeout)

    def read_file(self, path: Path | str) -> str:
        """Read a file by its path inside the namespace."""
        return self.host_path(path).read_text()

    def write_file(self, path: Path | str, content: str, mode: int = 0o644) -> Path:
        """Write a file by its path inside the namespace (parents created)."""
        target = self.host_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(mode)
        return Path(path)

    def write_unit(self, name: str, content: str, *, reload: bool = True) -> Path:
        """Write *name* into :attr:`unit_dir` and (by default) daemon-reload."""
        path = self.write_file(self.unit_dir / name, content)
        if reload:
            self.systemctl("daemon-reload", check=True)
        return path

    def log(self) -> str:
        """The manager's log so far, units' output included (kept after stop())."""
        if self._log is None:
            return self._final_log
        # pread: the file offset is shared with the manager, which appends to it.
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the manager; wait until it reports running (or degraded)."""
        if self._proc is not None:
            raise RuntimeError("user manager already started")
        began = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        base, tracking = _tracking_hierarchies()
        cg_path = f"{base.rstrip('/')}/{CGROUP_PREFIX}{uuid.uuid4().hex[:12]}"
        self._cgroup_path = cg_path
        self._hierarchies = _cgroup_hierarchies()
        try:
            joins: list[str] = []
            for hierarchy, key in tracking:
                cg_dir = hierarchy.directory(cg_path)
                if cg_dir is None or not cg_dir.parent.is_dir():
                    raise RuntimeError(f"cgroup {cg_path} not reachable in {hierarchy}")
                cg_dir.mkdir()
                joins += [str(cg_dir / "cgroup.procs"), f"{key}{cg_path}\n"]
            self._final_log = ""
            if self._log is None:
                self._log = tempfile.TemporaryFile(prefix="usermanager-", suffix=".log")  # noqa: SIM115 - closed in stop()
            console = self._start_console()
            argv = [
                "setpriv", "--pdeathsig", "TERM", "--",
                "unshare", "--mount", "--propagation", "private", "--",
                sys.executable, "-I", "-c", _LAUNCHER,
                str(self.runtime_dir), _MANAGER_CONF, SYSTEMD, console, *joins,
            ]  # fmt: skip
            self._proc = subprocess.Popen(
                argv,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd="/",
            )
            self._wait_running(deadline=began + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_duration = time.monotonic() - began

    def _start_console(self) -> str:
        """A raw pty for the namespace's /dev/console, copied into the log.

        systemd logs to the console only if it is a tty.  `cat` (our child)
        copies the master side into the log; we hold the slave open until
        stop(), after which `cat` drains the pty, reads EIO and exits.
        """
        assert self._log is not None
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            self._console_reader = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", "cat"],
                stdin=master,
                stdout=self._log,
                stderr=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(slave)
            raise
        finally:
            os.close(master)
        self._console_slave = slave
        return os.ttyname(slave)

    def _stop_console(self) -> None:
        if self._console_slave is not None:
            os.close(self._console_slave)
            self._console_slave = None
        reader = self._console_reader
        if reader is not None:
            try:
                reader.wait(timeout=2)
            except subprocess.TimeoutExpired:
                reader.kill()
                reader.wait()
            self._console_reader = None

    def _wait_running(self, deadline: float) -> None:
        assert self._proc is not None
        state = ""
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"systemd --user exited with {self._proc.returncode}:\n{self.log()}")
            # Until the launcher has exec'd systemd, /proc/<pid>/root and
            # nsenter would still reach the host's mount namespace.
            if self._is_systemd() and self.host_path(self.runtime_dir / "systemd" / "private").exists():
                res = self.systemctl("is-system-running", timeout=10)
                state = res.stdout.strip()
                if state in ("running", "degraded"):
                    self._check_contained()
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"systemd --user not running in time (state {state!r}):\n{self.log()}")
            time.sleep(0.05)

    def _is_systemd(self) -> bool:
        try:
            exe = os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            return False
        return os.path.realpath(exe) == os.path.realpath(SYSTEMD)

    def _check_contained(self) -> None:
        """Raise if the manager does not sit below its own cgroup."""
        assert self._cgroup_path is not None
        text = Path(f"/proc/{self.pid}/cgroup").read_text()
        for line in text.splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers in ("", "name=systemd") and not (path + "/").startswith(self._cgroup_path + "/"):
                raise RuntimeError(f"user manager escaped its cgroup {self._cgroup_path}: {text}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop all units and the manager; leave no process behind.

        ``systemctl --user exit`` first (the manager stops its units), then
        SIGTERM, then SIGKILL to the manager PID; finally SIGKILL to anything
        still in the manager's cgroup and removal of its cgroup directories.
        Raises RuntimeError if something survives.
        """
        proc = self._proc
        if proc is not None:
            deadline = time.monotonic() + timeout
            asked = False
            if proc.poll() is None and self._is_systemd():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    asked = self.systemctl("exit", timeout=max(1.0, timeout / 2)).returncode == 0
            if not asked:
                deadline = time.monotonic()  # straight to SIGTERM
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                    break
                except subprocess.TimeoutExpired:
                    proc.send_signal(sig)
                    deadline = time.monotonic() + 5
            proc.wait(timeout=5)
        survivors = self._cleanup_cgroups()
        self._stop_console()
        self._proc = None
        if self._log is not None:
            self._final_log = self.log()
            self._log.close()
            self._log = None
        if survivors:
            raise RuntimeError(f"processes survived the user manager: {sorted(survivors)}")

    def _cleanup_cgroups(self) -> set[int]:
        """Kill leftovers in our cgroup subtree and rmdir it everywhere."""
        if self._cgroup_path is None:
            return set()
        dirs = [d for h in self._hierarchies if (d := h.directory(self._cgroup_path)) is not None and d.exists()]
        deadline = time.monotonic() + 10
        while True:
            pids = set().union(*(_cgroup_pids(d) for d in dirs)) if dirs else set()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if all([_rmdir_tree(d) for d in dirs]):
                self._cgroup_path = None
                return set()
            if time.monotonic() > deadline:
                return {p for p in pids if _pid_alive(p)}
            time.sleep(0.05)

    def __enter__(self) -> UserManager:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def available() -> str | None:
    """None if a user manager can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (mount namespace, cgroup writes)"
    for tool in ("nsenter", "unshare", "setpriv", "mount", "systemctl", "systemd-run"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} not found"
    try:
        _tracking_hierarchies()
    except RuntimeError as e:
        return str(e)
    return None


def remove_stale_cgroups(min_age: float = 60.0) -> list[Path]:
    """Remove empty ``mvllmd-test-*`` cgroups left by killed test runs.

    Only directories older than *min_age* seconds are touched (a starting
    manager's fresh cgroup is empty for a moment), and rmdir fails on any
    cgroup that still has processes, so live managers are never affected.
    Returns the directories removed.
    """
    try:
        base, _ = _tracking_hierarchies()
    except RuntimeError:
        return []
    removed: list[Path] = []
    now = time.time()
    for hierarchy in _cgroup_hierarchies():
        parent = hierarchy.directory(base)
        if parent is None or not parent.is_dir():
            continue
        for candidate in parent.glob(CGROUP_PREFIX + "*"):
            try:
                if now - candidate.stat().st_mtime < min_age or _cgroup_pids(candidate):
                    continue
            except OSError:
                continue
            if _rmdir_tree(candidate):
                removed.append(candidate)
    return removed
