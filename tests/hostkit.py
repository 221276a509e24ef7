"""Several emulated hosts on one machine, for fleet tests: each its own address, hostname and file system.

Recipe (measured on Debian 12 / iproute2 6.1 / util-linux 2.38 / Linux 6.x, as root)::

    ip link add mvbTAG type bridge                       # in the root namespace: the "switch"
    ip addr add 10.R.0.1/24 dev mvbTAG; ip link set mvbTAG up
    ip netns add mvh-TAG-I                               # host I (1-based): 10.R.0.(I+1)
    ip link add mvhTAG-I type veth peer name eth0 netns mvh-TAG-I
    ip link set mvhTAG-I master mvbTAG up
    ip -n mvh-TAG-I addr add 10.R.0.(I+1)/24 dev eth0    # and lo up, eth0 up, default via 10.R.0.1
    mkdir -p BASE/hostfs
    setpriv --pdeathsig KILL -- ip netns exec mvh-TAG-I unshare --mount --uts --propagation private -- \\
        sh -c 'mount -t tmpfs tmpfs BASE/hostfs && hostname host-I && echo ready && exec sleep infinity'
    nsenter --target HOLDER --net --mount --uts --wd=DIR -- argv     # a command on host I

Why it looks like this, and what was checked:

* TAG is the test process's PID and a letter (one per Fleet it makes): two runs never collide, and
  names stay within IFNAMSIZ (15): ``mvh32768a-250`` is 13.  R is the first of 10.200-254.x.0/24 that no
  address or route of the root namespace overlaps, chosen under a lock file so that two runs at once
  pick two.  The root namespace (the test) reaches every host through the bridge's address; hosts
  reach each other through the bridge (layer 2: no ip_forward, no NAT).  The veth's end in the host
  is called ``eth0`` there, as on a real host.
* The holder is ``setpriv`` exec'ing ``ip netns exec`` exec'ing ``unshare`` exec'ing ``sh`` exec'ing
  ``sleep``: one PID throughout, :attr:`Host.holder_pid`.  ``ip netns exec`` enters the named network
  namespace and a mount namespace of its own (it remounts /sys for that network namespace);
  ``unshare`` adds a private mount namespace, whose tmpfs at :attr:`Host.private` only that host
  sees, and a UTS namespace, whose hostname is :attr:`Host.name` (``mvllmctl info`` shows it).  The
  path is the same on every host; the root namespace sees an empty directory there.  The test reads a
  host's files through ``/proc/HOLDER/root/...`` (:meth:`Host.inside`; root only).
* :meth:`Host.popen` and :meth:`Host.run` run ``nsenter --target HOLDER --net --mount --uts``, which
  execs the program in place (nsenter forks only to enter a PID namespace), so the Popen's PID is the
  program's own and signals sent to it reach it.  ``--wd`` is needed: entering a mount namespace moves
  the working directory to ``/``.  Every other path is shared with the root namespace (the venv,
  the test's temporary directories), so the same ``mvllmd`` runs on every host.
* :meth:`Host.link_down` sets the root namespace's end of the host's veth down: the host's ``eth0``
  loses its carrier, so nothing leaves it and nothing reaches it (checked both ways, and from the
  root namespace); :meth:`Host.link_up` restores it at once (the bridge runs no STP, so no delay).
* :meth:`Fleet.close` (also on an exception or Ctrl-C in the ``with`` body; SIGINT and SIGTERM are
  held back while it runs) sends SIGTERM to the process group of every program :meth:`Host.popen`
  started (each starts a session of its own), SIGKILL after a grace period, then SIGKILL to whatever
  still runs in each host's network namespace (its programs' children, the holder), deletes the veths,
  the namespaces and the bridge, and removes its directory.
* If the test process dies without ``close()`` (SIGKILL), the holders get SIGKILL and the programs
  SIGTERM (``setpriv --pdeathsig``; it fires when the *thread* that started them exits, so make a
  Fleet on the test's main thread; a program started in the instant before that death can miss it,
  as Popen returns before setpriv has set it).  The names stay behind: the next Fleet removes them
  (:func:`remove_stale`) and kills what still runs in their namespaces.  A run counts as dead when
  the lock on ``owner.lock`` in its directory is free (flock: released by the kernel when the process
  dies), not by its PID alone: PIDs wrap at 32768 here, and PID 1 leaves zombies unreaped.
* Bridged traffic passes iptables' FORWARD chain where ``net.bridge.bridge-nf-call-iptables`` is 1
  (br_netfilter loaded): a machine whose FORWARD policy drops packets (e.g. with Docker) would cut
  host-to-host traffic; this machine has no iptables rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from daemonkit import clean_environment

PREFIX = "mvh"  # every name this harness makes starts with it: netns mvh-TAG-I, veth mvhTAG-I
BRIDGE_PREFIX = "mvb"
SUBNETS = range(200, 255)  # 10.R.0.0/24
LOCK_PATH = Path("/tmp/mvllm-hostkit.lock")
TOOLS = ("ip", "nsenter", "unshare", "setpriv", "mount", "hostname", "sh", "sleep")
# Run by the holder, inside its namespaces: $1 the private path, $2 the hostname, $3 the tmpfs's options,
# $4 the host's address. Its own /etc/hosts names it: a program that resolves its host name (torch's
# distributed set-up, in vLLM) would otherwise ask a DNS server no emulated host can reach, and wait.
_HOLDER_SCRIPT = (
    'mount -t tmpfs -o "$3" tmpfs "$1" && hostname "$2" && '
    'printf "127.0.0.1 localhost\\n::1 localhost\\n%s %s\\n" "$4" "$2" > "$1/.etc-hosts" && '
    'mount --bind "$1/.etc-hosts" /etc/hosts && echo ready && exec sleep infinity'
)
OWNER_LOCK = "owner.lock"  # in a Fleet's directory, locked (flock) as long as the Fleet's process lives
_TAGGED_NETNS = re.compile(rf"^{PREFIX}-(\d+[a-z])-\d+$")
_TAGGED_LINK = re.compile(rf"^(?:{PREFIX}(\d+[a-z])-\d+|{BRIDGE_PREFIX}(\d+[a-z]))$")
_TAGGED_DIR = re.compile(rf"^{PREFIX}-(\d+[a-z])-")
_letters = itertools.cycle("abcdefghijklmnopqrstuvwxyz")


def available() -> str | None:
    """None if hosts can be emulated here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces, veth, bridge)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; its stdout.  RuntimeError with ip's message if it fails and `check`."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Host:
    """One emulated host: a network namespace with one address, and a private mount and UTS namespace."""

    name: str  # "host-1"; also its hostname
    address: str  # 10.R.0.(I+1)
    netns: str  # mvh-TAG-I
    veth: str  # the root namespace's end of its link: mvhTAG-I
    private: Path  # the same path on every host; each sees its own tmpfs there
    holder_pid: int = 0
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, argv: Sequence[str], cwd: Path | str | None = None) -> list[str]:
        """`argv` run on this host in `cwd` (default: the current directory); execs in place, same PID."""
        return ["nsenter", "--target", str(self.holder_pid), "--net", "--mount", "--uts",
                f"--wd={cwd or os.getcwd()}", "--", *argv]  # fmt: skip

    def popen(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, stdout: int | IO[bytes] | None = None,
        stderr: int | IO[bytes] | None = None, cwd: Path | str | None = None,
    ) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start `argv` on this host, in a session (process group) of its own; Fleet.close stops it if it
        still runs.  Gets SIGTERM if the test process dies."""
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", "--", *self.command(argv, cwd)],
            env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True,
        )  # fmt: skip
        self.started.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 30,
        cwd: Path | str | None = None, input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run `argv` on this host to its end; output captured as text, the exit status not checked."""
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *self.command(argv, cwd)]
        return subprocess.run(argv, env=env, input=input, capture_output=True, text=True, timeout=timeout, check=False)

    def inside(self, path: Path | str) -> Path:
        """The path by which the root namespace reaches `path` as this host sees it (root only)."""
        return Path(f"/proc/{self.holder_pid}/root{Path(path).resolve()}")

    def environment(self) -> dict[str, str]:
        """daemonkit.clean_environment, rooted in this host's private directory: every default of mvllmd
        and mvllmctl (runtime dir, state, HOME) lands on this host only."""
        outside = str(self.inside(self.private))
        env = clean_environment(Path(outside))
        return {k: str(self.private) + v.removeprefix(outside) if v.startswith(outside) else v for k, v in env.items()}

    def link_down(self) -> None:
        """Cut this host off: nothing reaches it, nothing leaves it (its eth0 loses its carrier)."""
        ip("link", "set", self.veth, "down")

    def link_up(self) -> None:
        ip("link", "set", self.veth, "up")


class Fleet:
    """`n` emulated hosts on one bridge, built at once; a context manager that removes them all.

    `prefix` names the hosts (``host-1`` ... ``host-N``, also their hostnames); `grace` is how long
    :meth:`close` waits after SIGTERM before SIGKILL; `private_size` is each host's tmpfs size.
    Attributes: ``hosts``, ``bridge`` (its name), ``network`` (10.R.0.0/24), ``gateway`` (the bridge's
    address, the hosts' default route, the address the root namespace talks from), ``base`` (its
    directory in /tmp, which holds the private mount point ``hostfs``).
    """

    def __init__(self, n: int, prefix: str = "host", grace: float = 10.0, private_size: str = "512M") -> None:
        if not 1 <= n <= 250:
            raise ValueError(f"1 to 250 hosts, not {n}")
        remove_stale()
        self.tag = f"{os.getpid()}{next(_letters)}"
        self.bridge = f"{BRIDGE_PREFIX}{self.tag}"
        self.grace = grace
        self.hosts: list[Host] = []
        self._holders: list[subprocess.Popen[bytes]] = []
        self._made_bridge = False
        self.base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.tag}-", dir="/tmp"))
        self._owner = _lock_owner(self.base)
        private = self.base / "hostfs"
        private.mkdir()
        try:
            self.network = self._make_bridge()
            self.gateway = str(self.network.network_address + 1)
            for i in range(1, n + 1):
                address = str(self.network.network_address + i + 1)
                host = Host(f"{prefix}-{i}", address, f"{PREFIX}-{self.tag}-{i}", f"{PREFIX}{self.tag}-{i}", private)
                self.hosts.append(host)
                self._make_host(host, private_size)
        except BaseException:
            self.close()
            raise

    def _make_bridge(self) -> ipaddress.IPv4Network:
        """The bridge, with the first free 10.R.0.1/24; under a lock, so that two runs pick two subnets."""
        with LOCK_PATH.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            network = _free_subnet()
            ip("link", "add", self.bridge, "type", "bridge")
            self._made_bridge = True
            ip("addr", "add", f"{network.network_address + 1}/{network.prefixlen}", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        return network

    def _make_host(self, host: Host, private_size: str) -> None:
        ip("netns", "add", host.netns)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        ip("link", "set", host.veth, "master", self.bridge, "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/{self.network.prefixlen}", "dev", "eth0")
        for link in ("lo", "eth0"):
            ip("-n", host.netns, "link", "set", link, "up")
        ip("-n", host.netns, "route", "add", "default", "via", self.gateway)
        holder = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--", "ip", "netns", "exec", host.netns,
             "unshare", "--mount", "--uts", "--propagation", "private", "--",
             "sh", "-c", _HOLDER_SCRIPT, "sh", str(host.private), host.name, f"mode=0755,size={private_size}",
             host.address],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", start_new_session=True,
        )  # fmt: skip
        self._holders.append(holder)
        host.holder_pid = holder.pid
        _wait_ready(holder, host.name)

    def close(self) -> None:
        """Stop every program started on the hosts, then the holders; delete the links, namespaces and
        bridge; remove the directory.  Idempotent; SIGINT and SIGTERM wait until it is done."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._stop_programs()
            for host in self.hosts:
                _kill_namespace(host.netns)
            for holder in self._holders:
                _reap(holder)
            self._holders.clear()
            for host in self.hosts:
                ip("link", "del", host.veth, check=False)
                ip("netns", "del", host.netns, check=False)
            self.hosts.clear()
            if self._made_bridge:
                ip("link", "del", self.bridge, check=False)
                self._made_bridge = False
            shutil.rmtree(self.base, ignore_errors=True)
            if self._owner >= 0:
                os.close(self._owner)
                self._owner = -1
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _stop_programs(self) -> None:
        """SIGTERM to each program's process group, SIGKILL to those left after the grace period."""
        procs = [p for host in self.hosts for p in host.started]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                if proc.poll() is None:  # not reaped: its PID, and so its group, is still ours
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
            deadline = time.monotonic() + self.grace
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.0, deadline - time.monotonic()))
        for host in self.hosts:
            host.started.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()


@contextlib.contextmanager
def emulated_hosts(n: int, prefix: str = "host") -> Iterator[list[Host]]:
    """`n` emulated hosts (a Fleet's), removed with everything started on them when the block ends."""
    with Fleet(n, prefix) as fleet:
        yield list(fleet.hosts)


def remove_stale() -> None:
    """Best effort: remove what an earlier run of this harness left behind when its process died (names
    whose Fleet's owner lock is free), killing what still runs in those namespaces."""
    netns = _tagged(_TAGGED_NETNS, ip("netns", "list", check=False).split())
    links = _tagged(_TAGGED_LINK, re.findall(r"^\d+: ([^:@]+)", ip("-o", "link", "show", check=False), re.M))
    dirs = _tagged(_TAGGED_DIR, [p.name for p in Path("/tmp").glob(f"{PREFIX}-*")])
    for tag in {*netns, *links, *dirs}:
        if _owner_alive(tag, [Path("/tmp", d) for d in dirs.get(tag, [])]):
            continue
        for name in netns.get(tag, []):
            _kill_namespace(name)
            ip("netns", "del", name, check=False)
        for name in links.get(tag, []):
            ip("link", "del", name, check=False)
        for name in dirs.get(tag, []):
            shutil.rmtree(Path("/tmp", name), ignore_errors=True)


def _tagged(pattern: re.Pattern[str], names: Sequence[str]) -> dict[str, list[str]]:
    """`names` that `pattern` matches, by their tag (pattern's first group that matched)."""
    found: dict[str, list[str]] = {}
    for name in names:
        if match := pattern.match(name):
            found.setdefault(next(g for g in match.groups() if g), []).append(name)
    return found


def _lock_owner(base: Path) -> int:
    """Create base/OWNER_LOCK already locked (flock on a temporary name, then rename): no other run ever
    sees it unlocked while this process lives.  The descriptor is not inherited by programs (O_CLOEXEC)."""
    tmp = base / f".{OWNER_LOCK}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    tmp.rename(base / OWNER_LOCK)
    return fd


def _owner_alive(tag: str, dirs: Sequence[Path]) -> bool:
    """Whether the process that made the names tagged `tag` may still use them: its owner lock is held;
    where there is none (a run killed before it took it), whether its PID runs, and not as a zombie
    (PID 1 here does not reap them).  A PID reused since then keeps the names until it ends."""
    locks = [d / OWNER_LOCK for d in dirs if (d / OWNER_LOCK).exists()]
    if not locks:
        return _pid_runs(int(tag[:-1]))
    for lock in locks:
        with lock.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    return False


def _pid_runs(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _free_subnet() -> ipaddress.IPv4Network:
    taken = [ipaddress.ip_interface(a).network for a in re.findall(r"inet (\S+)", ip("-4", "-o", "addr", "show"))]
    routes = ip("-4", "route", "show", "table", "all")
    for route in re.finditer(r"^(?:[a-z]+ )?(\d+\.\d+\.\d+\.\d+(?:/\d+)?) ", routes, re.MULTILINE):
        taken.append(ipaddress.ip_network(route[1], strict=False))
    for r in SUBNETS:
        candidate = ipaddress.IPv4Network(f"10.{r}.0.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise RuntimeError(f"no free 10.R.0.0/24 with R in {SUBNETS.start}-{SUBNETS.stop - 1}")


def _wait_ready(holder: subprocess.Popen[bytes], name: str, timeout: float = 10.0) -> None:
    assert holder.stdout is not None and holder.stderr is not None
    ready, _, _ = select.select([holder.stdout], [], [], timeout)
    line = holder.stdout.readline() if ready else b""
    if line != b"ready\n":
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        err = holder.stderr.read().decode(errors="replace").strip()
        raise RuntimeError(f"the holder of {name} did not start (rc {holder.returncode}): {err or line!r}")
    holder.stdout.close()
    holder.stderr.close()


def _kill_namespace(netns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in network namespace `netns` (one this harness made), until none is left."""
    deadline = time.monotonic() + timeout
    while pids := [int(p) for p in ip("netns", "pids", netns, check=False).split()]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return  # best effort: `ip netns del` still removes the name; the namespace goes with its last process
        time.sleep(0.05)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
