"""Run every benchmark, keep their tables, draw the plots, and (with --readme) rewrite README's section.

    .venv/bin/python benchmarks/run_all.py [--readme README.md] [--quick]     # `make bench`

Runs balance.py, throughput.py, memory.py, scale.py, dp_vs_tp.py, weights.py, the front door's benchmarks
(front_door*.py), hang.py, vllm_bench_serve.py and fleet.py one after another as subprocesses (their progress
goes to stderr; what they print on stdout, their tables, is kept verbatim), draws charts as PNG files in
docs/bench/ with matplotlib (mvllmctl.plots; the `bench` extra, which `make bench` installs), and prints the
report in markdown, each chart after its benchmark's table:

    balance_heterogeneous.png, balance_homogeneous.png   sequences running on each server over time, one
                                                         panel per policy (balance.py --timeline)
    dp_vs_tp.png      output tokens/s per layout and its speedup over 1 x TP8 (dp_vs_tp.py --json)
    throughput.png    samples/s of each approach (throughput.py's table)

With --readme FILE, the report replaces what lies between the lines `<!-- bench:start -->` and
`<!-- bench:end -->` of FILE. --quick runs smaller sizes (a few minutes). A benchmark that fails is
reported as failed; the others still run; the exit status is then 1. Without matplotlib the benchmarks
run and the report has no charts.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvllmctl.plots import LayoutBar, PlotUnavailable, draw_bars, draw_dp_vs_tp, draw_timelines

from benchkit import load_average, machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Bench:
    script: str
    title: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    data_flag: str = ""  # the script's flag to write what its charts are drawn from, as JSON


BENCHES = (
    Bench("balance.py", "Balance over heterogeneous servers", (),
          ("--prompts", "500", "--samples", "4", "--homogeneous-runs", "1"), "--timeline"),
    Bench("throughput.py", "Throughput against instant servers", (),
          ("--prompts", "10000", "--seed-prompts", "2000")),
    Bench("memory.py", "Memory of mvllmd for a large job", (), ("--sizes", "10000,100000")),
    Bench("scale.py", "mvllmd's CPU per sample as the servers grow", (), ("--prompts", "5000", "--runs", "1")),
    Bench("dp_vs_tp.py", "DP vs TP on 8 simulated GPUs", (), ("--prompts", "300", "--time-scale", "0.5"),
          "--json"),
    Bench("front_door.py", "The front door against straight requests and sglang-router", (), ("--duration", "3")),
    Bench("front_door_balance.py", "Balance through the front door", (), ("--sessions", "500")),
    Bench("front_door_sessions.py", "Sessions through the front door: prefix hits and makespan", (),
          ("--sessions", "200")),
    Bench("hang.py", "Hung servers found from their /metrics, for jobs and the front door", (), ("--engines", "sim")),
    Bench("vllm_bench_serve.py", "vllm bench serve through the front door (real vLLM CPU engines)", (),
          ("--prompts", "50")),
    Bench("weights.py", "Weights updated in place against stop-and-launch", (), ("--engines", "sim")),
    Bench("fleet.py", "Jobs through a peer's per-instance route, and launch to READY on two peers", (),
          ("--prompts", "5000", "--runs", "1", "--launch-rounds", "1")),
)  # fmt: skip


@dataclass(frozen=True)
class Result:
    bench: Bench
    command: str
    status: int
    seconds: float
    stdout: str
    data: Path | None  # what its data flag wrote, if it has one


def run_bench(bench: Bench, quick: bool, data_dir: Path) -> Result:
    """One benchmark as a subprocess. Its data flag, if any, points into DATA_DIR; the command shown in
    the report leaves it out (it only feeds the charts)."""
    args = bench.quick if quick else bench.full
    command = " ".join([".venv/bin/python", f"benchmarks/{bench.script}", *args])
    data = data_dir / f"{Path(bench.script).stem}.json" if bench.data_flag else None
    extra = [bench.data_flag, str(data)] if data else []
    print(f"== {command} {' '.join(extra)}".rstrip(), file=sys.stderr, flush=True)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(HERE / bench.script), *args, *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        stdout, _ = proc.communicate()
    except BaseException:
        proc.terminate()  # Ctrl-C reached it too; a SIGTERM to us must reach it as well
        proc.wait()
        raise
    seconds = time.monotonic() - started
    print(stdout, file=sys.stderr, flush=True)
    return Result(bench, command, proc.returncode, seconds, stdout.strip(), data if data and data.exists() else None)


# --- tables and plots ----------------------------------------------------------------------------


def parse_table(text: str) -> list[dict[str, str]]:
    """The first markdown table in TEXT, as rows of {header: cell}."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return []
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, body = cells[0], [row for row in cells[2:] if len(row) == len(cells[0])]
    return [dict(zip(header, row, strict=True)) for row in body]


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


Charts = dict[str, list[tuple[str, Path]]]
"""The charts of each benchmark script: (caption, path)."""


def plots(results: list[Result], folder: Path) -> Charts:
    """The charts that the results allow. A chart that cannot be drawn is left out with a word on stderr
    (an hour of benchmarks still reaches the README); without matplotlib, all of them."""
    by_script = {r.bench.script: r for r in results if r.status == 0}
    folder.mkdir(parents=True, exist_ok=True)
    drawers = {"balance.py": balance_charts, "dp_vs_tp.py": dp_vs_tp_chart, "throughput.py": throughput_chart}
    made: Charts = {}
    for script, draw in drawers.items():
        if script not in by_script:
            continue
        try:
            made[script] = draw(by_script[script], folder)
        except PlotUnavailable:
            print("run_all: no charts: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
            break
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            print(f"run_all: no chart for {script}: {e!r}", file=sys.stderr)
    return made


def balance_charts(result: Result, folder: Path) -> list[tuple[str, Path]]:
    """Per case, one panel per policy (its first run): sequences running on each server over time."""
    if result.data is None:
        return []
    doc: dict[str, Any] = json.loads(result.data.read_text())
    made = []
    for case in dict.fromkeys(run["case"] for run in doc["runs"]):
        runs = [run for run in doc["runs"] if run["case"] == case and run["run"] == 1]
        panels = {f"{run['policy']}: makespan {run['makespan_s']:.1f} s": {
                      server: [(t, n) for t, n in points] for server, points in run["servers"].items()}
                  for run in runs}  # fmt: skip
        speeds = ", ".join(f"{s:g}" for s in runs[0]["speeds"])
        title = (f"Balance, {case} servers (speeds {speeds}): sequences running on each server\n"
                 f"{doc['prompts']:,} prompts x {doc['samples']} samples, --time-scale {doc['time_scale']:g}, "
                 f"/metrics read every {doc['interval_s']:g} s")  # fmt: skip
        path = folder / f"balance_{case}.png"
        draw_timelines(panels, path, title, "time (simulated s)")
        made.append((f"Balance, {case} servers: sequences running on each server over time", path))
    return made


def dp_vs_tp_chart(result: Result, folder: Path) -> list[tuple[str, Path]]:
    if result.data is None:
        return []
    doc: dict[str, Any] = json.loads(result.data.read_text())
    layouts = [LayoutBar(row["instances"], row["tp"], row["output_tokens_per_s"]) for row in doc["rows"]]
    title = (f"DP vs TP on 8 simulated H100s (mvllm-sim profile {doc['profile']}), {doc['policy']}\n"
             f"{doc['prompts']:,} prompts x {doc['samples']} samples, max_tokens {doc['max_tokens']}")  # fmt: skip
    path = folder / "dp_vs_tp.png"
    draw_dp_vs_tp(layouts, path, title, "output tokens/s (simulated clock)")
    return [("DP vs TP: output tokens/s per layout", path)]


def approach_label(approach: str) -> str:
    """A throughput row's approach, short: "seed: AsyncOpenAI + ..." -> "seed", "mvllmd (gRPC ...)" -> "mvllmd",
    "for comparison: bare aiohttp loop, no job logic" -> "bare aiohttp loop"."""
    head, _, tail = approach.partition(" (")[0].partition(":")
    return tail.partition(",")[0].strip() if head == "for comparison" and tail else head


def throughput_chart(result: Result, folder: Path) -> list[tuple[str, Path]]:
    rows = parse_table(result.stdout)
    bars = [(approach_label(r["approach"]), number(r["samples/s"])) for r in rows]
    path = folder / "throughput.png"
    draw_bars(bars, path, "Job throughput against instant simulated servers", "samples/s")
    return [("Throughput: samples/s", path)]


# --- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """When and how the benchmarks ran."""

    started: str
    took_s: float
    arguments: str  # run_all.py's own, as given
    load_before: str


def report(results: list[Result], charts: Charts, readme_dir: Path, run: Run) -> str:
    lines = [
        f"Run on {run.started} by `.venv/bin/python benchmarks/run_all.py {run.arguments}`"
        f"{' (`make bench`)' if run.arguments == '--readme README.md' else ''}, in {run.took_s / 60:.0f} min.",
        "",
        f"- Machine: {machine()}.",
        f"- Load: {run.load_before} before, {load_average()} after (other work may share the machine).",
        "- Servers are `mvllm-sim` processes on this same machine; makespans are wall time divided by the",
        "  simulators' `--time-scale`.",
        "",
    ]
    for result in results:
        lines += [f"### {result.bench.title}", "", "```sh", result.command, "```", ""]
        if result.status != 0:
            lines += [f"**Failed** (exit status {result.status}) after {result.seconds:.0f} s.", ""]
        lines += [result.stdout, "", f"({result.seconds:.0f} s)", ""]
        for caption, path in charts.get(result.bench.script, []):
            lines += [f"![{caption}]({os.path.relpath(path, readme_dir)})", ""]
    return "\n".join(lines).rstrip() + "\n"


def rewrite_readme(readme: Path, section: str) -> None:
    text = readme.read_text()
    head, found, rest = text.partition(START)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise SystemExit(f"run_all: {readme} has no {START} ... {END} section")
    readme.write_text(f"{head}{START}\n{section}{END}{tail}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, help="rewrite this file's bench section")
    p.add_argument("--quick", action="store_true", help="smaller sizes: a few minutes")
    p.add_argument("--plots", type=Path, default=ROOT / "docs" / "bench", help="where the PNG charts go [docs/bench]")
    p.add_argument("--only", help="run only these scripts, comma-separated (e.g. throughput.py)")
    args = p.parse_args()
    benches = [b for b in BENCHES if not args.only or b.script in args.only.split(",")]
    started, load_before, t0 = time.strftime("%Y-%m-%d %H:%M %Z"), load_average(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mv-bench-data-") as data_dir:
        results = [run_bench(bench, args.quick, Path(data_dir)) for bench in benches]
        charts = plots(results, args.plots)
    readme_dir = (args.readme or ROOT / "README.md").resolve().parent
    run = Run(started, time.monotonic() - t0, shlex.join(sys.argv[1:]), load_before)
    section = report(results, charts, readme_dir, run)
    print(section)
    if args.readme:
        rewrite_readme(args.readme, section)
        print(f"run_all: wrote the bench section of {args.readme}", file=sys.stderr)
    return 0 if all(r.status == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
