"""The HTTP front door's throughput and added latency, against straight requests and sglang-router.

    .venv/bin/python benchmarks/front_door.py [--duration 5] [--concurrency 64] [--rounds 1]
        [--sglang-policy round_robin] [--profile FILE]

One mvllmd (built-in supervisor) launches two mvllm-sim instances that answer at once (`--time-scale 0`:
no simulated time is waited for) and serves them through its front door on a free port. Against those
same two servers, three targets:

- straight:      the load generator splits its connections (or, open loop, its requests) over the two
                 servers itself, round robin; no proxy;
- mvllmd:        the front door (least-loaded over the two; no sessions);
- sglang-router: `python -m sglang_router.launch_router --worker-urls URL1 URL2 --policy POLICY`,
                 sglang-router --sglang-version installed by this script into a throwaway virtualenv,
                 ${XDG_CACHE_HOME:-~/.cache}/mvllm/bench-sglang-router-VERSION (reused when there). If it
                 cannot be installed (no network) or started, its row says why and the rest still runs.

The load generator (front_door_load.py) is a process of its own, the same for every target: 8-token
non-streamed completions over keep-alive connections. Each target is measured twice:

- at saturation: a closed loop of --concurrency connections, --duration s after 1 s of warm-up:
  the most requests/s it serves;
- at half load: an open loop at a fixed rate, half of sglang-router's requests/s at saturation (of
  mvllmd's when sglang-router did not run), so that latency is read at a load every target keeps up
  with: p50 and p99, and what the proxy adds to straight requests at the same rate ("added").

A proxy's CPU per request is its process's user + system time (/proc/PID/stat, its threads and
children included, the servers excepted: mvllmd's supervisor starts them as its children) over the
generator's whole run, divided by the requests it sent (warm-up included); the same for the servers.
The generator, the proxy and the two servers share this machine's cores. Prints a markdown table and
the goal: the front door at least sglang-router's requests/s, and added p50 <= 1 ms at half load (a
benchmark goal, not a test).

--profile FILE runs the daemon under cProfile (a sitecustomize on PYTHONPATH that only mvllmd acts on),
measures the front door alone at saturation, writes the stats to FILE and prints the top functions by
own and by cumulative time, per request; the rates of such a run are the profiler's, not the front
door's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchkit import children, cpu_seconds, exit_on_sigterm, free_port, load_average, machine, mvllmd, print_table

HERE = Path(__file__).resolve().parent
MODEL = "sim"
SGLANG_VERSION = "0.3.2"
BODY = {"model": MODEL, "prompt": "Say something short.", "max_tokens": 8}


@dataclass
class Target:
    name: str
    urls: list[str]  # the generator splits its load over these
    pid: int | None = None  # the proxy's process; None straight
    note: str = ""  # why it did not run, when it did not


@dataclass
class Reading:
    rps: float
    p50_ms: float
    p99_ms: float
    proxy_cpu_us: float | None
    servers_cpu_us: float
    errors: int
    late_ms: float
    generator_cpu_us: float
    sent: int  # requests sent in all, the warm-up's too


# --- sglang-router in a throwaway environment -----------------------------------------------------


def sglang_env(version: str) -> tuple[Path | None, str]:
    """The interpreter of a virtualenv holding sglang-router VERSION, made if need be; or None and why."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mvllm"
    env = cache / f"bench-sglang-router-{version}"
    python, stamp = env / "bin" / "python", env / ".installed"
    if stamp.exists() and python.exists():
        return python, ""
    print(f"installing sglang-router {version} into {env} ...", file=sys.stderr, flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", "--clear", str(env)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              f"sglang-router=={version}"]]  # fmt: skip
    for argv in steps:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"not installed: {exc}"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            return None, f"not installed (`{' '.join(argv[-3:])}` failed: {last[:160]})"
    stamp.touch()
    return python, ""


@contextlib.contextmanager
def sglang_router(python: Path, urls: Sequence[str], policy: str, timeout_s: float = 60.0) -> Iterator[Target]:
    """sglang-router over URLS, answering completions; stopped (its process group) after, whatever happens."""
    port = free_port()
    argv = [str(python), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *urls, "--policy", policy, "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(free_port()), "--log-level", "error"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_answering(url, proc, timeout_s)
        yield Target(f"sglang-router {policy}", [url], proc.pid)
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group that PROC leads (we started it so), then SIGKILL after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def _wait_answering(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    """Until URL answers a completion with 200 (a proxy is up and sees its servers)."""
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""
            raise RuntimeError(f"{url} exited with status {proc.returncode}: {err}")
        try:
            response = httpx.post(f"{url}/v1/completions", json=BODY, timeout=5)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer a completion in {timeout_s:g} s (last: {last})")


# --- measuring ------------------------------------------------------------------------------------


def process_cpu_s(pid: int, servers: Collection[int]) -> float:
    """A proxy's CPU: its process's and its children's (sglang-router's launcher starts the router), but
    the servers' (mvllmd's built-in supervisor starts the simulators as its children)."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children(pid) - set(servers))


def measure(target: Target, servers: Sequence[int], args: argparse.Namespace, rate: float) -> Reading:
    """One run of the load generator against TARGET (closed loop when RATE is 0)."""
    argv = [sys.executable, str(HERE / "front_door_load.py"), "--concurrency", str(args.concurrency),
            "--rate", str(rate), "--warmup", "1", "--duration", str(args.duration)]  # fmt: skip
    for url in target.urls:
        argv += ["--url", url]
    proxy0 = process_cpu_s(target.pid, servers) if target.pid else 0.0
    servers0 = sum(cpu_seconds(pid) for pid in servers)
    if args.profile and target.pid:
        args.profile.unlink(missing_ok=True)
        os.kill(target.pid, signal.SIGUSR1)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 120, check=False)
    if args.profile and target.pid:
        os.kill(target.pid, signal.SIGUSR2)
        _wait_for_file(args.profile)
    proxy = process_cpu_s(target.pid, servers) - proxy0 if target.pid else None
    servers_s = sum(cpu_seconds(pid) for pid in servers) - servers0
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed against {target.name}: {done.stderr[-500:]}")
    got = json.loads(done.stdout)
    if got["errors"]:
        print(f"{target.name}: {got['errors']} errors, the first: {got['first_error']}", file=sys.stderr)
    count = max(1, got["sent"])  # the CPU readings span the warm-up too
    proxy_us = None if proxy is None else proxy / count * 1e6
    return Reading(got["rps"], got["p50_ms"], got["p99_ms"], proxy_us, servers_s / count * 1e6, got["errors"],
                   got["late_ms"], got["generator_cpu_us"], got["sent"])  # fmt: skip


def median_reading(readings: list[Reading]) -> Reading:
    """Field by field, the median of the rounds."""
    fields = list(Reading.__dataclass_fields__)
    values: dict[str, Any] = {}
    for name in fields:
        column = [getattr(r, name) for r in readings]
        values[name] = None if None in column else statistics.median(column)
    return Reading(**values)


# --- profiling --------------------------------------------------------------------------------------

# In mvllmd only: SIGUSR1 starts cProfile (on the main thread, the event loop's), SIGUSR2 stops it and
# writes the stats, so that start-up and shutdown stay out of them.
SITECUSTOMIZE = """\
import cProfile, os, signal, sys
if os.path.basename(sys.argv[0]) == "mvllmd":
    _profile = cProfile.Profile()
    def _stop(*_):
        _profile.disable()
        _profile.dump_stats(os.environ["MVLLM_BENCH_PROFILE"])
    signal.signal(signal.SIGUSR1, lambda *_: _profile.enable())
    signal.signal(signal.SIGUSR2, _stop)
"""


@contextlib.contextmanager
def profiled_daemon(out: Path | None) -> Iterator[None]:
    """With OUT, the mvllmd started inside runs under cProfile and writes its stats to OUT when it exits."""
    if out is None:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="mv-profile-") as tmp:
        Path(tmp, "sitecustomize.py").write_text(SITECUSTOMIZE)
        saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "MVLLM_BENCH_PROFILE")}
        os.environ.update(PYTHONPATH=tmp, MVLLM_BENCH_PROFILE=str(out.resolve()))
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _wait_for_file(path: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def print_profile(path: Path, requests: float) -> None:
    """The daemon's functions by own time and by cumulative time, with µs per front-door request."""
    import pstats  # noqa: PLC0415  (only with --profile)

    if not path.exists():
        print(f"no profile written to {path}", file=sys.stderr)
        return
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]  # {(file, line, name): (cc, nc, tt, ct, callers)}
    for title, column in (("own time", 2), ("cumulative time", 3)):
        print(f"\n{title}, µs per request ({requests:,.0f} requests, the warm-up's included):\n")
        rows = []
        for (file, line, name), values in sorted(entries.items(), key=lambda kv: -kv[1][column])[:25]:
            where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
            rows.append([f"{name} ({where})", f"{values[1]:,}", f"{values[column] / requests * 1e6:.1f}"])
        print_table(["function", "calls", "µs per request"], rows)


# --- the run ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[list[Target], dict[str, Reading], dict[str, Reading], float]:
    python, why = sglang_env(args.sglang_version)
    port = free_port()
    with profiled_daemon(args.profile), mvllmd(2, "--http-listen", f"http://127.0.0.1:{port}") as daemon:
        instances = daemon.launch(MODEL, 2, engine_args=["--time-scale", "0"])
        urls = [i.url.removesuffix("/v1") for i in instances]
        servers = [i.pid for i in instances]
        front = Target("mvllmd front door", [f"http://127.0.0.1:{port}"], daemon.pid)
        _wait_answering(front.urls[0], None, 30)
        with contextlib.ExitStack() as stack:
            router = Target(f"sglang-router {args.sglang_policy}", [], note=why)
            if python is not None:
                try:
                    router = stack.enter_context(sglang_router(python, urls, args.sglang_policy))
                except RuntimeError as exc:
                    router.note = f"did not start: {exc}"
            targets = [Target("straight (the generator round-robins over both)", urls), front, router]
            live = [t for t in targets if not t.note]
            if args.profile:  # the front door alone, at saturation: the profile of the proxying
                return targets, rounds([front], servers, args, 0.0), {}, 0.0
            full = rounds(live, servers, args, 0.0)
            reference = full.get(router.name) or full[front.name]
            rate = round(reference.rps / 2, -1)
            half = rounds(live, servers, args, rate)
    return targets, full, half, rate


def rounds(targets: list[Target], servers: list[int], args: argparse.Namespace, rate: float) -> dict[str, Reading]:
    """--rounds runs of every target at RATE (0: closed loop), in turn (the order reversed every other
    round); the median of each."""
    got: dict[str, list[Reading]] = {}
    for round_ in range(args.rounds):
        order = targets if round_ % 2 == 0 else targets[::-1]
        for target in order:
            what = f"at {rate:,.0f}/s" if rate else f"closed loop of {args.concurrency}"
            print(f"{target.name}, {what} ...", file=sys.stderr, flush=True)
            got.setdefault(target.name, []).append(measure(target, servers, args, rate))
    return {name: median_reading(readings) for name, readings in got.items()}


def report(targets: list[Target], full: dict[str, Reading], half: dict[str, Reading], rate: float,
           header: str) -> None:  # fmt: skip
    print(header + "\n")
    straight = half.get(targets[0].name)
    rows = []
    for target in targets:
        if target.note:
            rows.append([target.name, target.note, *[""] * 8])
            continue
        f, h = full[target.name], half[target.name]
        added = (f"{h.p50_ms - straight.p50_ms:+.2f}", f"{h.p99_ms - straight.p99_ms:+.2f}") if straight else ("", "")
        if target.pid is None:
            added = ("", "")
        rows.append([
            target.name, f"{f.rps:,.0f}", f"{f.p50_ms:.1f} / {f.p99_ms:.1f}", _us(f.proxy_cpu_us),
            f"{h.p50_ms:.2f}", f"{h.p99_ms:.2f}", added[0], added[1], _us(h.proxy_cpu_us),
            f"{f.servers_cpu_us:.0f} / {h.servers_cpu_us:.0f}",
        ])  # fmt: skip
    print_table(["target", "max requests/s", "p50 / p99 ms at max", "proxy CPU µs/request at max",
                 f"p50 ms at {rate:,.0f}/s", f"p99 ms at {rate:,.0f}/s", "added p50 ms", "added p99 ms",
                 f"proxy CPU µs/request at {rate:,.0f}/s", "servers' CPU µs/request (max / half)"], rows)  # fmt: skip
    print()
    for name, readings in (("saturation", full), ("half load", half)):
        for target_name, r in readings.items():
            if r.errors or r.late_ms > 50:
                print(f"note: {target_name}, {name}: {r.errors:.0f} errors, the generator at worst "
                      f"{r.late_ms:.0f} ms behind its schedule")  # fmt: skip
    print(goal(targets, full, half))


def goal(targets: list[Target], full: dict[str, Reading], half: dict[str, Reading]) -> str:
    straight, front, router = targets
    if front.name not in full:
        return "goal: not measured"
    mine = full[front.name]
    lines = []
    if router.name in full:
        theirs = full[router.name].rps
        met = "met" if mine.rps >= theirs else "not met"
        lines.append(f"goal: the front door's requests/s >= sglang-router's: {mine.rps:,.0f} against {theirs:,.0f} "
                     f"({mine.rps / theirs:.2f} x): {met}")  # fmt: skip
    else:
        lines.append("goal: the front door's requests/s >= sglang-router's: not measured (sglang-router did not run)")
    added = half[front.name].p50_ms - half[straight.name].p50_ms
    lines.append(f"goal: the front door's added p50 <= 1 ms at half load: {added:+.2f} ms: "
                 f"{'met' if added <= 1.0 else 'not met'}")  # fmt: skip
    return "\n".join(lines)


def _us(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per run, after 1 s of warm-up [5]")
    p.add_argument("--concurrency", type=int, default=64, help="connections of the closed loop [64]")
    p.add_argument("--rounds", type=int, default=1, help="runs of every target; the median is shown [1]")
    p.add_argument("--sglang-version", default=SGLANG_VERSION, help=f"sglang-router from PyPI [{SGLANG_VERSION}]")
    p.add_argument("--sglang-policy", default="round_robin",
                   choices=["round_robin", "cache_aware", "power_of_two", "random"], help="[round_robin]")  # fmt: skip
    p.add_argument("--profile", type=Path, help="run mvllmd under cProfile; its stats to this file")
    args = p.parse_args()
    exit_on_sigterm()
    header = (f"front door, 8-token completions, 2 mvllm-sim instances at --time-scale 0 launched by mvllmd; "
              f"the load generator in its own process; {args.duration:g} s measured per run after 1 s of "
              f"warm-up, median of {args.rounds}; {time.strftime('%Y-%m-%d %H:%M %Z')}; {machine()}; "
              f"{load_average()} at the start")  # fmt: skip
    targets, full, half, rate = run(args)
    if args.profile:
        front = full[targets[1].name]
        print(f"under cProfile: {front.rps:,.0f} requests/s, {front.proxy_cpu_us:.0f} µs of CPU per request")
        print_profile(args.profile, front.sent)
        return
    report(targets, full, half, rate, header)


if __name__ == "__main__":
    main()
