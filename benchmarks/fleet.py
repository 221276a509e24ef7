"""The fleet of hosts: jobs through a peer's per-instance route against the same servers reached directly,
and the time from launch to READY for 8 simulated instances on two peers.

    .venv/bin/python benchmarks/fleet.py [--prompts 20000] [--runs 2] [--launch-rounds 2] [--profile FILE]

Every daemon is an mvllmd on loopback with its own state directory and a host certificate of one fleet CA
(`mvllmd certs`), made for the run in a temp dir; peers serve gRPC over mutual TLS and an https listener.

Throughput: a peer, h2, launches two mvllm-sim instances that answer at once (--time-scale 0); a
coordinator, h1, has no instances of its own and h2 as its one peer (--fleet-host). The same job (one
sample per prompt, max_tokens 8, --max-concurrent samples in flight) is submitted to h1 over gRPC three ways,
in turn (the order reversed every other run), --runs times each. Unseeded, a turn's requests to one server
travel as one, several prompts a request (transport/batches.py); --seed N runs a seeded job, one prompt a
request:

- through the route: the job names the model only, so its servers are h1's fleet, h2's two READY
  instances, reached through h2's per-instance route (https://h2/i/NAME/v1/..., h2's route token): h1's
  dispatcher sends every request over TLS to h2's daemon, which relays it to the simulator;
- direct: the job names the same two simulators by URL (--endpoints http://127.0.0.1:PORT), so h1 reaches
  them straight. The same coordinator runs the same job runner and dispatcher over the same servers; only
  the route differs (TLS, and the peer daemon's relay). A job on h2 itself would not be: its dispatcher
  would run in the daemon that relays in the other case;
- for the split, not a way a fleet runs: through the route in plain http. A second coordinator, h4, alike
  but for this, dials h2 at 127.0.0.2 (loopback too), where h2 has a plain http listener, which is then
  the one h4's requests take (hosts/link.py picks the listener on the address a peer is dialled at): the
  relay without TLS, so that what the route costs parts into the relay's share and TLS's.

Timed from SubmitJob until GetJob (polled every 20 ms) says SUCCEEDED; CPU from /proc/PID/stat of h1's
(or h4's) and h2's daemons and of the simulators, per sample. Goal: the route at 0.8 of direct or more.

Launch: two peers, h2 and h3, of 4 simulated GPUs each, and the coordinator h1. Four instances on each
peer (the sims' default start, no --startup-delay), two ways in turn: two `mvllmctl launch -n 4` at once,
each over its peer's socket, and one fleet launch from the coordinator, `mvllmctl launch -n 8 --hosts
h2,h3` over h1's socket (packed: 4 fill h2, 4 h3). Timed until each command returns (it waits for READY)
and until h1 sees all 8 READY: its front door (an http listener on loopback, only for this) lists every
READY server of its fleet in its /metrics (mvllm_server_inflight), polled every 20 ms. Then they are
stopped, and the next launch starts once h1 has let them go.

--profile FILE runs h2's daemon (or h1's, with --profile-host h1) under cProfile during the runs through
the route (as front_door.py does), and prints its functions per sample; the rates of such a run are the
profiler's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from front_door import print_profile, profiled_daemon

from mvllm.v1 import fleet_pb2, fleet_pb2_grpc, instance_pb2, job_pb2

from benchkit import (
    Daemon,
    cpu_seconds,
    exit_on_sigterm,
    free_port,
    load_average,
    machine,
    mvllmd,
    print_table,
    write_prompts,
)

MODEL = "sim"
MAX_TOKENS = 8
BIN = Path(sys.executable).parent
GOAL = 0.8
ROUTE, DIRECT, PLAIN = "route", "direct", "plain"
WAYS = (ROUTE, DIRECT, PLAIN)
SPLIT_HOST = "127.0.0.2"  # loopback too


# --- the fleet -----------------------------------------------------------------------------------


def make_certs(folder: Path, hosts: Sequence[str]) -> None:
    """The fleet CA and one host certificate per name, for 127.0.0.1 and 127.0.0.2, in FOLDER."""
    commands = [["ca"], *(["host", name, "--address", "127.0.0.1", "--address", SPLIT_HOST] for name in hosts)]
    for command in commands:
        subprocess.run([str(BIN / "mvllmd"), "certs", *command, "--dir", str(folder)], check=True,
                       capture_output=True)  # fmt: skip


def tls(certs: Path, name: str) -> list[str]:
    return ["--tls-cert", f"{certs}/{name}.pem", "--tls-key", f"{certs}/{name}.key",
            "--tls-client-ca", f"{certs}/ca.pem"]  # fmt: skip


@dataclass(frozen=True)
class PeerPorts:
    grpc: int
    https: int
    # For the split: gRPC on 127.0.0.2 too, and a plain http listener there, which the peer's coordinators
    # that dial it at 127.0.0.2 use (hosts/link.py: the listener on the host it is dialled at)
    split_grpc: int | None = None
    split_http: int | None = None


def peer_flags(certs: Path, name: str, ports: PeerPorts) -> list[str]:
    """A peer: gRPC over mutual TLS on loopback, and the https listener of its per-instance routes."""
    flags = ["--listen", f"127.0.0.1:{ports.grpc}", *tls(certs, name), "--http-listen",
             f"https://127.0.0.1:{ports.https}"]  # fmt: skip
    if ports.split_grpc and ports.split_http:
        flags += ["--listen", f"{SPLIT_HOST}:{ports.split_grpc}", "--http-listen",
                  f"http://{SPLIT_HOST}:{ports.split_http}"]  # fmt: skip
    return flags


def coordinator_flags(certs: Path, peers: dict[str, PeerPorts], http_port: int | None, name: str = "h1"
                      ) -> list[str]:  # fmt: skip
    """A coordinator: no TCP listener of its own, the peers dialled with its host certificate; h4 dials them
    at 127.0.0.2, where they have a plain http listener."""
    listen = f"http://127.0.0.1:{http_port}" if http_port else "none"
    flags = [*tls(certs, name), "--http-listen", listen]
    for peer, ports in peers.items():
        address = f"{SPLIT_HOST}:{ports.split_grpc}" if name == "h4" else f"127.0.0.1:{ports.grpc}"
        flags += ["--fleet-host", f"{peer}={address}"]
    return flags


def wait_reachable(coordinator: Daemon, peers: Sequence[str], timeout_s: float = 30.0) -> None:
    """Until the coordinator reaches every peer (and so knows its instances)."""
    stub = fleet_pb2_grpc.FleetServiceStub(coordinator.channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hosts = stub.ListHosts(fleet_pb2.ListHostsRequest()).hosts
        if all(any(h.name == name and h.reachable for h in hosts) for name in peers):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the coordinator did not reach {', '.join(peers)} in {timeout_s:g}s: {hosts}")


def sock(daemon: Daemon) -> str:
    return str(daemon.tmp / "m.sock")


# --- throughput ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    route: str
    samples: int
    wall_s: float
    coordinator_s: float
    peer_s: float
    sims_s: float
    machine_s: float  # CPU seconds of the whole machine, anyone's

    @property
    def ours_s(self) -> float:
        return self.coordinator_s + self.peer_s + self.sims_s

    @property
    def rate(self) -> float:
        return self.samples / self.wall_s


def cpu_readings(coordinator: int, peer: int, sims: list[int]) -> list[float]:
    """CPU seconds so far: of h1's daemon, h2's, the simulators, and the whole machine."""
    return [cpu_seconds(coordinator), cpu_seconds(peer), sum(cpu_seconds(p) for p in sims), machine_cpu_s()]


def run_job(coordinator: Daemon, spec: job_pb2.JobSpec, route: str, pids: tuple[int, int, list[int]]) -> Reading:
    before = cpu_readings(*pids)
    job, wall = coordinator.run_job(spec)
    after = cpu_readings(*pids)
    if job.samples_done != job.samples_total or job.errors:
        raise RuntimeError(f"{route}: {job.samples_done} of {job.samples_total} done, {job.errors} errors")
    wanted = {ROUTE: "https://", DIRECT: "http://127.0.0.1:", PLAIN: f"http://{SPLIT_HOST}:"}[route]
    routed = [e.url for e in job.endpoints if e.completed and (("/i/" in e.url) == (route == DIRECT)
                                                              or not e.url.startswith(wanted))]  # fmt: skip
    if routed:
        raise RuntimeError(f"{route}: the job's samples went to {routed}")
    used = [b - a for a, b in zip(before, after, strict=True)]
    return Reading(route, job.samples_done, wall, *used)


def machine_cpu_s() -> float:
    """CPU seconds the machine's cores have been busy (not idle, not waiting for I/O), from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:7]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # user .. softirq


@contextlib.contextmanager
def profiling(pid: int, profile: Path | None, enabled: bool) -> Iterator[None]:
    """SIGUSR1 starts the profile of a daemon started under profiled_daemon, SIGUSR2 stops it and writes it."""
    if not enabled or profile is None:
        yield
        return
    os.kill(pid, signal.SIGUSR1)
    try:
        yield
    finally:
        profile.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR2)
        _wait_for(profile)


def job_spec(args: argparse.Namespace, tmp: Path, endpoints: Sequence[str] = ()) -> job_pb2.JobSpec:
    data = tmp / "prompts.parquet"
    if not data.exists():
        write_prompts(data, args.prompts)
    return job_pb2.JobSpec(input_path=str(data), output_path=str(tmp / "out.parquet"), num_samples=1, model=MODEL,
                           sampling=job_pb2.SamplingParams(max_tokens=MAX_TOKENS, seed=args.seed),
                           endpoints=list(endpoints),
                           max_concurrent=args.max_concurrent, overwrite=True)  # fmt: skip


def throughput(args: argparse.Namespace, certs: Path, tmp: Path) -> list[Reading]:
    ports = PeerPorts(free_port(), free_port(), free_port(), free_port())
    with contextlib.ExitStack() as stack:
        with profiled_daemon(args.profile if args.profile_host == "h2" else None):
            peer = stack.enter_context(mvllmd(2, *peer_flags(certs, "h2", ports)))
        instances = peer.launch(MODEL, 2, engine_args=["--time-scale", "0"])
        with profiled_daemon(args.profile if args.profile_host == "h1" else None):
            coordinator = stack.enter_context(mvllmd(0, *coordinator_flags(certs, {"h2": ports}, None)))
        split = stack.enter_context(mvllmd(0, *coordinator_flags(certs, {"h2": ports}, None, name="h4")))
        wait_reachable(coordinator, ["h2"])
        wait_reachable(split, ["h2"])
        ways = {ROUTE: (coordinator, job_spec(args, tmp)),
                DIRECT: (coordinator, job_spec(args, tmp, [i.url.removesuffix("/v1") for i in instances])),
                PLAIN: (split, job_spec(args, tmp))}  # fmt: skip
        profiled = peer if args.profile_host == "h2" else coordinator
        readings = []
        for run in range(args.runs):
            for route in WAYS if run % 2 == 0 else WAYS[::-1]:
                print(f"{route}, run {run + 1} ...", file=sys.stderr, flush=True)
                daemon, spec = ways[route]
                pids = (daemon.pid, peer.pid, [i.pid for i in instances])
                with profiling(profiled.pid, args.profile, route == ROUTE):
                    readings.append(run_job(daemon, spec, route, pids))
                print(f"  {readings[-1].rate:,.0f} samples/s", file=sys.stderr, flush=True)
    return readings


def _wait_for(path: Path, timeout_s: float = 10.0) -> None:
    """Until PATH exists and its size has held for 0.2 s (the profile is written whole)."""
    deadline, size = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        now = path.stat().st_size if path.exists() else -1
        if now >= 0 and now == size:
            return
        size = now
        time.sleep(0.2)


# --- launch --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchRound:
    way: str  # PEERS or FLEET
    returned_s: dict[str, float]  # each `mvllmctl launch` (by the host it was sent to) from start to return
    coordinator_s: float  # until the coordinator listed them all READY


PEERS, FLEET = "peers", "fleet"


def coordinator_servers(url: str, prefix: str) -> int:
    """How many servers the coordinator's front door lists whose route names an instance PREFIX*."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(1 for line in text.splitlines() if line.startswith("mvllm_server_inflight{") and f"/i/{prefix}" in line)


def start_launch(daemon: Daemon, count: int, name: str, hosts: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """`mvllmctl launch` of COUNT simulators named NAME-0, ... over the daemon's socket (on HOSTS of its fleet,
    packed, when given); it waits for READY."""
    argv = [str(BIN / "mvllmctl"), "--address", f"unix:{sock(daemon)}", "launch", MODEL, "--engine", "sim",
            "-n", str(count), "--name", name]  # fmt: skip
    if hosts:
        argv += ["--hosts", ",".join(hosts)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@dataclass(frozen=True)
class Fleet:
    peers: dict[str, Daemon]
    coordinator: Daemon
    front: str  # the coordinator's front door
    per_peer: int  # instances launched on each peer


def launch_round(way: str, fleet: Fleet, prefix: str) -> LaunchRound:
    """Launch fleet.per_peer instances on each peer, PEERS: one `mvllmctl launch` per peer at once, over its
    socket, or FLEET: one `mvllmctl launch --hosts` on the coordinator; until all READY and seen by the
    coordinator."""
    peers, n = fleet.peers, fleet.per_peer
    total = n * len(peers)
    started = time.monotonic()
    if way == PEERS:
        procs = {name: start_launch(daemon, n, f"{prefix}{name}") for name, daemon in peers.items()}
    else:
        procs = {"h1": start_launch(fleet.coordinator, total, prefix.rstrip("-"), list(peers))}
    returned: dict[str, float] = {}
    seen_s = None
    try:
        while len(returned) < len(procs) or seen_s is None:
            if time.monotonic() - started > 120:
                raise RuntimeError(f"launch {prefix}: not all READY in 120 s")
            for name, proc in procs.items():
                if name not in returned and proc.poll() is not None:
                    if proc.returncode != 0:
                        why = proc.stderr.read().decode() if proc.stderr else ""
                        raise RuntimeError(f"mvllmctl launch on {name}: {why}")
                    returned[name] = time.monotonic() - started
            if seen_s is None and coordinator_servers(fleet.front, prefix) >= total:
                seen_s = time.monotonic() - started
            time.sleep(0.02)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
    for daemon in peers.values():
        listed = daemon.instances.ListInstances(instance_pb2.ListInstancesRequest()).instances
        daemon.engine_pids.update(i.pid for i in listed if i.pid)
    return LaunchRound(way, returned, seen_s)


def stop_round(fleet: Fleet, prefix: str) -> None:
    for daemon in fleet.peers.values():
        daemon.stop_instances()
    deadline = time.monotonic() + 60
    while coordinator_servers(fleet.front, prefix) and time.monotonic() < deadline:
        time.sleep(0.05)


def launches(args: argparse.Namespace, certs: Path) -> list[LaunchRound]:
    ports = {name: PeerPorts(free_port(), free_port()) for name in ("h2", "h3")}
    http_port = free_port()
    rounds = []
    with contextlib.ExitStack() as stack:
        peers = {name: stack.enter_context(mvllmd(args.per_peer, *peer_flags(certs, name, p)))
                 for name, p in ports.items()}  # fmt: skip
        coordinator = stack.enter_context(mvllmd(0, *coordinator_flags(certs, ports, http_port)))
        wait_reachable(coordinator, list(peers))
        fleet = Fleet(peers, coordinator, f"http://127.0.0.1:{http_port}", args.per_peer)
        for round_ in range(args.launch_rounds):
            for way in (PEERS, FLEET) if round_ % 2 == 0 else (FLEET, PEERS):
                print(f"launch, {way}, round {round_ + 1} ...", file=sys.stderr, flush=True)
                prefix = f"r{round_}-{way}-"
                rounds.append(launch_round(way, fleet, prefix))
                stop_round(fleet, prefix)
    return rounds


# --- the report ----------------------------------------------------------------------------------


NAMES = {
    ROUTE: "through h2's per-instance route: h1's fleet (https, route token; h2's daemon relays)",
    DIRECT: "direct: the same 2 simulators by URL (--endpoints), from h1",
    PLAIN: "for the split, not a fleet's way: the same route in plain http (from h4, alike)",
}


def print_throughput(args: argparse.Namespace, readings: list[Reading]) -> None:
    seeded = f", seeded ({args.seed}: one prompt a request)" if args.seed is not None else ""
    print(f"fleet throughput, {args.prompts:,} prompts x 1 sample{seeded}, max_tokens {MAX_TOKENS}, "
          f"{args.max_concurrent} samples in flight; a peer mvllmd (h2) with 2 mvllm-sim instances at --time-scale 0, "
          f"a coordinator mvllmd (h1) with none, over mutual TLS on loopback; the job on h1 (h4 for the split), "
          f"three ways in turn, {args.runs} runs each; all processes share the cores; "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {machine()}; {load_average()} at the start\n")  # fmt: skip
    rows = []
    for r in readings:
        per = 1e6 / r.samples
        rows.append([NAMES[r.route], f"{r.samples:,}", f"{r.wall_s:.1f}", f"{r.rate:,.0f}",
                     f"{r.coordinator_s * per:.0f}", f"{r.peer_s * per:.0f}", f"{r.sims_s * per:.0f}",
                     f"{r.ours_s / r.wall_s:.2f} / {r.machine_s / r.wall_s:.2f}"])  # fmt: skip
    print_table(["job's servers", "samples", "seconds", "samples/s", "coordinator CPU µs/sample",
                 "h2 daemon CPU µs/sample", "simulators' CPU µs/sample", "cores busy: these processes / the machine"],
                rows)  # fmt: skip
    rate = {way: statistics.median(r.rate for r in readings if r.route == way) for way in WAYS}
    cpu = {way: statistics.median(r.ours_s / r.samples * 1e6 for r in readings if r.route == way) for way in WAYS}
    ratio = rate[ROUTE] / rate[DIRECT]
    print(f"\nthrough the route / direct, medians: {rate[ROUTE]:,.0f} / {rate[DIRECT]:,.0f} samples/s = {ratio:.2f} "
          f"(goal >= {GOAL}: {'met' if ratio >= GOAL else 'not met'}); in plain http {rate[PLAIN]:,.0f} "
          f"({rate[PLAIN] / rate[DIRECT]:.2f} of direct)")  # fmt: skip
    print(f"CPU per sample, all these processes, medians: direct {cpu[DIRECT]:.0f} µs, through the route "
          f"{cpu[ROUTE]:.0f} µs: +{cpu[ROUTE] - cpu[DIRECT]:.0f}, of which the relay (plain http) "
          f"+{cpu[PLAIN] - cpu[DIRECT]:.0f} and TLS +{cpu[ROUTE] - cpu[PLAIN]:.0f}")  # fmt: skip
    print("direct is the fair comparison: the same coordinator's job runner and dispatcher over the same two "
          "servers; only the route differs (TLS to h2's listener, and h2's daemon relaying each request)")  # fmt: skip
    print("a job opens its own keep-alive connections, about one per sample in flight, each with a TLS "
          "handshake through the route: their share per sample shrinks as a job grows (smaller jobs, --quick's, "
          "fare worse)")  # fmt: skip


def print_launches(args: argparse.Namespace, rounds: list[LaunchRound]) -> None:
    total, n = args.per_peer * 2, args.per_peer
    print(f"\nlaunch to READY, {total} simulated instances on two peers (h2, h3: {n} each, of {n} simulated GPUs "
          f"each), the sims' default start; the coordinator h1 sees them READY when its front door lists all "
          f"{total} as servers (its /metrics); the two ways in turn\n")  # fmt: skip
    names = {PEERS: f"two `mvllmctl launch -n {n}` at once, one over each peer's socket",
             FLEET: f"`mvllmctl launch -n {total} --hosts h2,h3` on h1 (packed)"}  # fmt: skip
    rows = []
    for i, r in enumerate(rounds):
        returned = " / ".join(f"{r.returned_s[h]:.2f}" for h in sorted(r.returned_s))
        rows.append([names[r.way], i // 2 + 1, returned, f"{r.coordinator_s:.2f}"])
    print_table(["how", "round", "launch returned (s; h2 / h3 for two)", f"h1 sees all {total} READY (s)"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=20_000, help="per job [20000]")
    p.add_argument("--runs", type=int, default=2, help="jobs each way, in turn [2]")
    p.add_argument("--max-concurrent", type=int, default=256, help="samples in flight [256]")
    p.add_argument("--launch-rounds", type=int, default=2, help="rounds of the launch measure [2]")
    p.add_argument("--per-peer", type=int, default=4, help="instances launched on each of the two peers [4]")
    p.add_argument(
        "--seed",
        type=int,
        help="a seeded job: one prompt a request (an unseeded job's go several a request: transport/batches.py)",
    )
    p.add_argument("--profile", type=Path, help="run a daemon under cProfile; its stats to this file")
    p.add_argument("--profile-host", choices=["h1", "h2"], default="h2", help="the daemon --profile profiles [h2]")
    args = p.parse_args()
    exit_on_sigterm()
    if args.profile:
        args.profile = args.profile.resolve()
        args.profile.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="mv-bench-fleet-", dir="/tmp") as tmp:
        certs = Path(tmp)
        make_certs(certs, ["h1", "h2", "h3", "h4"])
        readings = throughput(args, certs, certs)
        rounds = launches(args, certs) if args.launch_rounds else []
    print_throughput(args, readings)
    if rounds:
        print_launches(args, rounds)
    if args.profile:
        print_profile(args.profile, sum(r.samples for r in readings if r.route == ROUTE))


if __name__ == "__main__":
    main()
