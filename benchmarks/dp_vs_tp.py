"""Data parallel or tensor parallel on one 8-GPU host: the seed's table, redone on the simulator.

    .venv/bin/python benchmarks/dp_vs_tp.py [--prompts 1000] [--samples 10] [--time-scale 1] [--json FILE]

One mvllmd with 8 simulated GPUs runs, in turn, 8 x TP1, 4 x TP2, 2 x TP4 and 1 x TP8 instances of
mvllm-sim's h100-8b profile (Llama-3.1-8B on H100 SXM, with its TP variants), all at one --time-scale.
For each, one job of PROMPTS prompts x SAMPLES samples (max_tokens --max-tokens, the simulator's
long-tailed output lengths) is submitted through the daemon and waited for, with every sample allowed
in flight (each server fills its own batch). Makespan is wall time divided by the time scale, in
simulated seconds; samples/s and output tokens/s are per simulated second. Prints a table, relative to
1 x TP8. With --json FILE, FILE also gets the run's settings and rows, for run_all.py to draw:

    {"profile": "h100-8b", "prompts": 1000, "samples": 10, "max_tokens": 1024, "time_scale": 1.0,
     "policy": "least-loaded", "rows": [{"instances": 8, "tp": 1, "makespan_s": 23.6, "samples": 10000,
     "completion_tokens": 2675000, "samples_per_s": 424.6, "output_tokens_per_s": 113359.0}, ...]}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from mvllm.v1 import job_pb2

from benchkit import exit_on_sigterm, load_average, machine, mvllmd, print_table, write_prompts

MODEL = "llama-3.1-8b"
PROFILE = "h100-8b"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=1000, help="[1000]")
    p.add_argument("--samples", type=int, default=10, help="samples per prompt [10]")
    p.add_argument("--max-tokens", type=int, default=1024, help="per sample [1024]")
    p.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per simulated second [1]")
    p.add_argument("--policy", choices=["least-loaded", "round-robin"], default="least-loaded")
    p.add_argument("--layouts", default="8x1,4x2,2x4,1x8", help="INSTANCESxTP, comma-separated [8x1,4x2,2x4,1x8]")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the settings and rows to FILE as JSON")
    args = p.parse_args()
    exit_on_sigterm()
    header = (f"DP vs TP on 8 simulated H100s, mvllm-sim profile {PROFILE}, {args.prompts:,} prompts x "
              f"{args.samples} samples, max_tokens {args.max_tokens}, policy {args.policy}, through mvllmd; "
              f"--time-scale {args.time_scale:g} (makespan = wall / time scale); {time.strftime('%Y-%m-%d')}; "
              f"{machine()}; {load_average()} at the start\n")  # fmt: skip
    layouts = [tuple(int(x) for x in layout.split("x")) for layout in args.layouts.split(",")]
    policy = job_pb2.POLICY_ROUND_ROBIN if args.policy == "round-robin" else job_pb2.POLICY_LEAST_LOADED
    results = []
    with tempfile.TemporaryDirectory(prefix="mv-bench-", dir="/tmp") as tmp, mvllmd(8) as daemon:
        data = Path(tmp, "prompts.parquet")
        write_prompts(data, args.prompts)
        engine_args = ["--time-scale", f"{args.time_scale:g}", "--profile", PROFILE]
        for count, tp in layouts:
            print(f"{count} x TP{tp} ...", file=sys.stderr, flush=True)
            daemon.launch(MODEL, count, tp, engine_args)
            spec = job_pb2.JobSpec(
                input_path=str(data),
                output_path=str(Path(tmp, f"out-{count}x{tp}.parquet")),
                num_samples=args.samples,
                model=MODEL,
                sampling=job_pb2.SamplingParams(max_tokens=args.max_tokens),
                policy=policy,
                max_concurrent=args.prompts * args.samples,
            )
            job, wall = daemon.run_job(spec)
            daemon.stop_instances()
            results.append((count, tp, wall / args.time_scale, job.samples_done, job.completion_tokens))
    print(header)
    base = next((r for r in results if r[:2] == (1, 8)), results[-1])
    rows = []
    for count, tp, makespan, samples, tokens in results:
        rows.append([count, tp, f"{makespan:.1f}", f"{samples / makespan:,.1f}", f"{tokens / makespan:,.0f}",
                     f"{tokens / makespan / (base[4] / base[2]):.2f}x"])  # fmt: skip
    print_table(["instances", "TP", "makespan (simulated s)", "samples/s", "output tokens/s",
                 f"vs {base[0]} x TP{base[1]}"], rows)  # fmt: skip
    if args.json:
        write_json(args, results)


def write_json(args: argparse.Namespace, results: list[tuple[int, int, float, int, int]]) -> None:
    rows = [{"instances": count, "tp": tp, "makespan_s": round(makespan, 3), "samples": samples,
             "completion_tokens": tokens, "samples_per_s": round(samples / makespan, 3),
             "output_tokens_per_s": round(tokens / makespan, 3)}
            for count, tp, makespan, samples, tokens in results]  # fmt: skip
    doc = {"profile": PROFILE, "prompts": args.prompts, "samples": args.samples, "max_tokens": args.max_tokens,
           "time_scale": args.time_scale, "policy": args.policy, "rows": rows}  # fmt: skip
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"dp_vs_tp: wrote the rows to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
