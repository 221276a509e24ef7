"""Memory of a job in mvllmd: peak RSS of the daemon for a small and a very large job.

    .venv/bin/python benchmarks/memory.py [--sizes 10000,1000000] [--servers 1]

For each size, a fresh mvllmd (built-in supervisor) launches --servers mvllm-sim instances that
answer at once (--time-scale 0), then runs one job over them: SIZE prompts, 1 sample each, max_tokens 8,
the daemon's defaults otherwise. The daemon's peak RSS is its VmHWM (/proc/PID/status) read when the
job has SUCCEEDED (output assembled); VmRSS is also sampled every 0.2 s, of the daemon and of any
process it starts other than the engines (the simulators' own peak is shown apart). The baseline is a
python that only imports grpc, pyarrow and pandas. Prints a table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mvllm.v1 import job_pb2

from benchkit import (
    RssSampler,
    exit_on_sigterm,
    load_average,
    machine,
    mvllmd,
    print_table,
    proc_status_kb,
    write_prompts,
)

MODEL = "sim"
MAX_TOKENS = 8
BASELINE = "import grpc, pyarrow, pandas; print(open('/proc/self/status').read())"


def baseline_mb() -> float:
    """Peak RSS of a python that imports grpc, pyarrow and pandas, and nothing else."""
    status = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True).stdout
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def one_job(prompts: int, servers: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="mv-bench-", dir="/tmp") as tmp, mvllmd(servers) as daemon:
        instances = daemon.launch(MODEL, servers, engine_args=["--time-scale", "0"])
        engines = [i.pid for i in instances]
        data = Path(tmp, "prompts.parquet")
        write_prompts(data, prompts)
        before_mb = proc_status_kb(daemon.pid, "VmHWM") / 1024
        spec = job_pb2.JobSpec(
            input_path=str(data),
            output_path=str(Path(tmp, "out.parquet")),
            num_samples=1,
            model=MODEL,
            sampling=job_pb2.SamplingParams(max_tokens=MAX_TOKENS),
        )
        with RssSampler([daemon.pid], skip=engines) as daemon_rss, RssSampler(engines) as engine_rss:
            job, wall = daemon.run_job(spec)
        hwm_mb = proc_status_kb(daemon.pid, "VmHWM") / 1024
    others = {pid: kb for pid, kb in daemon_rss.peak_kb.items() if pid != daemon.pid}
    other = f"{max(others.values()) / 1024:.0f} ({len(others)})" if others else "none"
    return [f"{prompts:,}", f"{hwm_mb:.0f}", f"{daemon_rss.peak_kb[daemon.pid] / 1024:.0f}", f"{before_mb:.0f}",
            other, f"{max(engine_rss.peak_kb.values()) / 1024:.0f}", f"{wall:.1f}",
            f"{job.samples_done / wall:,.0f}"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,1000000", help="prompts per job, comma-separated [10000,1000000]")
    p.add_argument("--servers", type=int, default=1, help="mvllm-sim instances [1]")
    args = p.parse_args()
    exit_on_sigterm()
    header = (f"mvllmd memory, 1 sample per prompt, max_tokens {MAX_TOKENS}, {args.servers} mvllm-sim instances at "
              f"--time-scale 0, the daemon's default job settings; a fresh daemon per job; "
              f"{time.strftime('%Y-%m-%d')}; {machine()}; {load_average()} at the start\n")  # fmt: skip
    rows = [["baseline: python -c 'import grpc, pyarrow, pandas'", f"{baseline_mb():.0f}", "", "", "", "", "", ""]]
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"{size:,} prompts ...", file=sys.stderr, flush=True)
        rows.append(one_job(size, args.servers))
    print(header)
    print_table(["prompts", "mvllmd peak RSS MB (VmHWM)", "sampled peak MB", "before the job MB",
                 "other children MB", "each simulator MB", "seconds", "samples/s"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
