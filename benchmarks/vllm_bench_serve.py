"""vLLM's own `vllm bench serve` against mvllmd's front door, with two real vLLM CPU engines behind it.

    .venv/bin/python benchmarks/vllm_bench_serve.py [--prompts 200] [--input-len 256] [--output-len 128]
                                                     [--concurrency 32]

Starts mvllmd (built-in supervisor, front door on a free port) in a temp dir, launches two engines of
the vLLM CPU build serving the tiny model (`make engine`), and runs scripts/vllm_bench_serve.py
(`vllm bench serve`, random dataset) with the engine's python: once through the front door, and once
straight at one engine for comparison. The tiny model makes gibberish fast, so the figures measure
the serving path (HTTP, scheduling, the proxy), not a model; both engines share this machine's cores
with the load generator and the daemon. Prints a table, each engine's share of the front door's
requests (from its own /metrics), and vLLM's summary of the front-door run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from benchkit import ctl, engine_dir, exit_on_sigterm, mvllmd, print_table

HERE = Path(__file__).resolve().parent
SCRIPT = HERE.parent / "scripts" / "vllm_bench_serve.py"
READY_TIMEOUT_S = 600


def finished(engine_url: str) -> float:
    """The requests the engine has finished, by its /metrics (vllm:request_success_total)."""
    total = 0.0
    for line in httpx.get(f"{engine_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:request_success_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def bench(url: str, model: str, args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], str]:
    """One `vllm bench serve` run against URL: its result JSON and what it printed."""
    python = engine_dir() / "venv" / "bin" / "python"
    argv = [str(python), str(SCRIPT), "--base-url", url, "--model", model, "--tokenizer", model,
            "--dataset-name", "random", "--num-prompts", str(args.prompts), "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--max-concurrency", str(args.concurrency),
            "--disable-tqdm", "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
            "--seed", "0"]  # fmt: skip
    print(f"vllm bench serve against {url}", file=sys.stderr, flush=True)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(out.read_text()), done.stdout


def summary(printed: str) -> str:
    """vLLM's own summary block from what `vllm bench serve` printed."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if "Serving Benchmark Result" in line)
    end = max(i for i, line in enumerate(lines) if set(line.strip()) == {"="})
    return "\n".join(lines[start : end + 1])


def row(name: str, result: dict[str, Any]) -> Sequence[object]:
    return (name, f"{result['completed']}/{result['failed']}", f"{result['request_throughput']:.1f}",
            f"{result['output_throughput']:,.0f}", f"{result['median_ttft_ms']:.0f}", f"{result['p99_ttft_ms']:.0f}",
            f"{result['median_tpot_ms']:.1f}", f"{result['p99_tpot_ms']:.1f}")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most [32]")
    args = p.parse_args()
    exit_on_sigterm()
    engine = engine_dir()
    model = str(engine / "tiny-qwen2")
    if not (engine / "venv" / "bin" / "python").exists():
        raise SystemExit(f"vllm_bench_serve: the vLLM CPU build is not in {engine}; run `make engine`")
    with tempfile.TemporaryDirectory(prefix="mv-vbs-", dir="/tmp") as tmp:
        config = Path(tmp) / "mvllmd.toml"
        config.write_text(f'[inventory]\ncpu_slots = 2\n[engine.vllm]\npython = "{engine}/venv/bin/python"\n')
        with mvllmd(0, "--config", str(config), "--http-listen", "http://127.0.0.1:0") as daemon:
            sock = f"{daemon.tmp}/m.sock"
            print("launching two vLLM CPU engines (about a minute)", file=sys.stderr, flush=True)
            ctl(sock, "launch", model, "-n", "2", "--cpu", "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--name", "bench",
                "--wait-timeout", str(READY_TIMEOUT_S), timeout=READY_TIMEOUT_S + 60)  # fmt: skip
            (door,) = json.loads(ctl(sock, "info", "--json"))["http_urls"]
            engines = [i["url"] for i in json.loads(ctl(sock, "status", "--json"))["instances"]]
            before = [finished(url) for url in engines]
            through, printed = bench(door, model, args, Path(tmp) / "front-door.json")
            served = [finished(url) - b for url, b in zip(engines, before, strict=True)]
            straight, _ = bench(engines[0], model, args, Path(tmp) / "straight.json")
    print(f"{args.prompts} prompts of {args.input_len} random tokens, {args.output_len} tokens each (ignore_eos), "
          f"at most {args.concurrency} in flight; the tiny Qwen2 model on the vLLM CPU build 0.32.0.\n")  # fmt: skip
    print_table(("target", "completed/failed", "requests/s", "output tokens/s", "TTFT p50 ms", "TTFT p99 ms",
                 "TPOT p50 ms", "TPOT p99 ms"),
                [row("front door, 2 engines", through), row("one engine directly", straight)])  # fmt: skip
    shares = ", ".join(f"{n:.0f}" for n in served)
    print(f"\nRequests each engine finished during the front-door run (its vllm:request_success_total): {shares}.")
    print(f"\nvLLM's summary of the front-door run:\n\n```\n{summary(printed)}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
