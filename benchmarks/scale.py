"""mvllmd's CPU per sample as the number of servers grows: does the dispatcher's cost stay flat?

    .venv/bin/python benchmarks/scale.py [--servers 2,32,128] [--prompts 20000] [--runs 2]

One stand-in process serves every server: `--servers N` mvllm-sim servers (the simulator's own
SimServer, at --time-scale 0, so each answers at once) on N ports of one event loop, so that the
machine measures the dispatcher, not N event loops. mvllmd runs a job over all of them, named by URL
(`endpoints`), one sample per prompt, max_tokens 8, 256 samples in flight, the daemon's default
policy (least-loaded) and /metrics read each second from every server. The table gives mvllmd's CPU
seconds (utime + stime from /proc, from submit to SUCCEEDED) per sample, and samples per second of
wall time. Each size runs --runs times for each of two jobs, in turn; the median is shown:

- unseeded: the requests the dispatcher sends to one server in one turn of its loop go as one, several
  prompts a request (transport/batches.py), so a sample costs less, the more so the more requests each
  server gets in a turn: with 256 in flight over 128 servers, a few; over 2, dozens;
- seeded: one prompt a request: the dispatcher's own cost, which the goal is about.

The goal (issue 12): 128 servers cost at most 1.5 x what 2 cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mvllm.v1 import job_pb2

from benchkit import cpu_seconds, exit_on_sigterm, free_port, load_average, machine, mvllmd, print_table, write_prompts

MAX_CONCURRENT = 256


def serve(count: int, port_base: int) -> None:
    """The stand-in process: COUNT simulators on ports port_base.. in one loop; prints READY when bound."""
    import uvloop  # noqa: PLC0415  (only the stand-in process needs them)

    from mvllm_sim.cli import config_from, parser  # noqa: PLC0415
    from mvllm_sim.server import SimServer  # noqa: PLC0415

    async def main() -> None:
        config = config_from(parser().parse_args(["--time-scale", "0", "--max-num-seqs", "256"]))
        servers = [SimServer(config) for _ in range(count)]
        for offset, server in enumerate(servers):
            await server.start("127.0.0.1", port_base + offset)
        print("READY", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


@contextlib.contextmanager
def stand_ins(count: int) -> Iterator[tuple[list[str], int]]:
    """COUNT servers in one child process; their base URLs and the process's PID."""
    port_base = _free_range(count)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(count), "--port-base", str(port_base)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"the stand-in process for {count} servers did not start")
        yield [f"http://127.0.0.1:{port_base + i}" for i in range(count)], proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_range(count: int) -> int:
    """A base port with COUNT free ports after it (checked by binding each)."""
    import socket  # noqa: PLC0415

    for _ in range(50):
        base = free_port()
        if base + count >= 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                # As the stand-ins' servers bind (asyncio sets it): a port a closed connection left in
                # TIME-WAIT is free for them (thousands after a few runs).
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} free ports in a row")


SEED = 1
KINDS = (None, SEED)  # an unseeded job, and a seeded one


def one_run(urls: list[str], data: Path, out: Path, seed: int | None) -> tuple[float, float]:
    """mvllmd CPU seconds per sample, and samples per second, for one job over URLS."""
    with mvllmd(0) as daemon:
        spec = job_pb2.JobSpec(input_path=str(data), output_path=str(out), num_samples=1,
                               sampling=job_pb2.SamplingParams(max_tokens=8, seed=seed), endpoints=urls,
                               max_concurrent=MAX_CONCURRENT, overwrite=True)  # fmt: skip
        before = cpu_seconds(daemon.pid)
        job, wall = daemon.run_job(spec)
        used = cpu_seconds(daemon.pid) - before
    return used / job.samples_total, job.samples_total / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="2,32,128", help="Comma-separated server counts. [%(default)s]")
    p.add_argument("--prompts", type=int, default=20_000, help="Prompts per job (one sample each). [%(default)s]")
    p.add_argument("--runs", type=int, default=2, help="Jobs per server count and kind; the median. [%(default)s]")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port-base", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port_base)
        return
    exit_on_sigterm()
    counts = [int(c) for c in args.servers.split(",")]
    print(f"scale, {args.prompts:,} prompts x 1 sample, max_tokens 8, {MAX_CONCURRENT} in flight, servers named by "
          f"URL, one stand-in process (mvllm-sim at --time-scale 0) for all; each job unseeded (a turn's requests "
          f"to one server travel together) and seeded ({SEED}: one prompt a request), in turn; median of "
          f"{args.runs}; {time.strftime('%Y-%m-%d')}; {machine()}; {load_average()} at the start\n")  # fmt: skip
    rows: list[list[object]] = []
    base: dict[int | None, float] = {}
    with tempfile.TemporaryDirectory(prefix="mv-scale-", dir="/tmp") as tmp:
        data = Path(tmp) / "prompts.parquet"
        write_prompts(data, args.prompts)
        for count in counts:
            runs: dict[int | None, list[tuple[float, float]]] = {seed: [] for seed in KINDS}
            with stand_ins(count) as (urls, _):
                for _ in range(args.runs):
                    for seed in KINDS:
                        runs[seed].append(one_run(urls, data, Path(tmp) / "out.parquet", seed))
            row: list[object] = [count]
            for seed in KINDS:
                cpu = statistics.median(r[0] for r in runs[seed])
                rate = statistics.median(r[1] for r in runs[seed])
                base.setdefault(seed, cpu)
                print(f"{count} servers, {'seeded' if seed else 'unseeded'}: {cpu * 1e6:.0f} us per sample, "
                      f"{rate:,.0f} samples/s", file=sys.stderr)  # fmt: skip
                row += [f"{cpu * 1e6:.0f}", f"{cpu / base[seed]:.2f}", f"{rate:,.0f}"]
            rows.append(row)
    first = counts[0]
    print_table(["servers", "unseeded: mvllmd CPU per sample (us)", f"x the {first} servers' cost", "samples/s",
                 "seeded: mvllmd CPU per sample (us)", f"x the {first} servers' cost", "samples/s"], rows)  # fmt: skip
    print(
        f"\ngoal: {counts[-1]} servers cost at most 1.5 x what {first} cost, in the dispatcher's own cost (seeded: "
        f"one prompt a request); unseeded, the fewer requests each server gets in a turn of the loop, the fewer "
        f"travel together"
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
