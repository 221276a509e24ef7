"""Run every benchmark, keep their tables, draw the plots, and (with --readme) rewrite README's section.

    .venv/bin/python benchmarks/run_all.py [--readme README.md] [--quick]     # `make bench`

Runs balance.py, throughput.py, memory.py, scale.py, dp_vs_tp.py, weights.py, the front door's benchmarks
(front_door*.py), hang.py, vllm_bench_serve.py and fleet.py one after another as subprocesses (their progress
goes to stderr; what they print on stdout, their tables, is kept verbatim), draws bar charts of DP vs TP
output tokens/s and of the throughput approaches as SVG files in docs/bench/, and prints the report in
markdown. With --readme FILE, the report replaces what lies between the lines
`<!-- bench:start -->` and `<!-- bench:end -->` of FILE. --quick runs smaller sizes (a few minutes).
A benchmark that fails is reported as failed; the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import html
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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


BENCHES = (
    Bench("balance.py", "Balance over heterogeneous servers", (),
          ("--prompts", "500", "--samples", "4", "--homogeneous-runs", "1")),
    Bench("throughput.py", "Throughput against instant servers", (),
          ("--prompts", "10000", "--seed-prompts", "2000")),
    Bench("memory.py", "Memory of mvllmd for a large job", (), ("--sizes", "10000,100000")),
    Bench("scale.py", "mvllmd's CPU per sample as the servers grow", (), ("--prompts", "5000", "--runs", "1")),
    Bench("dp_vs_tp.py", "DP vs TP on 8 simulated GPUs", (), ("--prompts", "300", "--time-scale", "0.5")),
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


def run_bench(bench: Bench, quick: bool) -> Result:
    args = bench.quick if quick else bench.full
    command = " ".join([".venv/bin/python", f"benchmarks/{bench.script}", *args])
    print(f"== {command}", file=sys.stderr, flush=True)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(HERE / bench.script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        stdout, _ = proc.communicate()
    except BaseException:
        proc.terminate()  # Ctrl-C reached it too; a SIGTERM to us must reach it as well
        proc.wait()
        raise
    seconds = time.monotonic() - started
    print(stdout, file=sys.stderr, flush=True)
    return Result(bench, command, proc.returncode, seconds, stdout.strip())


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


def bar_chart(title: str, unit: str, bars: list[tuple[str, float]]) -> str:
    """A horizontal bar chart as a standalone SVG document."""
    label_w, bar_w, row_h, top = 200, 400, 34, 48
    width, height = label_w + bar_w + 110, top + row_h * len(bars) + 36
    peak = max((v for _, v in bars), default=1.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="15" font-weight="bold">'
        f"{html.escape(title)}</text>",
    ]
    for i, (label, value) in enumerate(bars):
        y = top + i * row_h
        w = max(1.0, bar_w * value / peak)
        parts += [
            f'<text x="{label_w - 8}" y="{y + 18}" text-anchor="end">{html.escape(label)}</text>',
            f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 10}" fill="#4878a8"/>',
            f'<text x="{label_w + w + 6:.1f}" y="{y + 18}">{value:,.0f}</text>',
        ]
    axis_y = top + row_h * len(bars) + 4
    parts += [
        f'<line x1="{label_w}" y1="{top}" x2="{label_w}" y2="{axis_y}" stroke="black"/>',
        f'<text x="{label_w + bar_w / 2}" y="{axis_y + 22}" text-anchor="middle">{html.escape(unit)}</text>',
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def plots(results: list[Result], folder: Path) -> list[tuple[str, Path]]:
    """The charts that the results allow: (caption, path)."""
    made = []
    by_script = {r.bench.script: r for r in results if r.status == 0}
    folder.mkdir(parents=True, exist_ok=True)
    if "dp_vs_tp.py" in by_script:
        rows = parse_table(by_script["dp_vs_tp.py"].stdout)
        bars = [(f"{r['instances']} x TP{r['TP']}", number(r["output tokens/s"])) for r in rows]
        path = folder / "dp_vs_tp.svg"
        path.write_text(bar_chart("DP vs TP, 8 simulated H100s, Llama-3.1-8B profile",
                                  "output tokens/s (simulated clock)", bars))  # fmt: skip
        made.append(("DP vs TP: output tokens/s", path))
    if "throughput.py" in by_script:
        rows = parse_table(by_script["throughput.py"].stdout)
        bars = [(r["approach"].split(" (")[0].split(":")[0], number(r["samples/s"])) for r in rows]
        path = folder / "throughput.svg"
        path.write_text(bar_chart("Job throughput against instant simulated servers", "samples/s", bars))
        made.append(("Throughput: samples/s", path))
    return made


# --- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """When and how the benchmarks ran."""

    started: str
    took_s: float
    quick: bool
    load_before: str


def report(results: list[Result], charts: list[tuple[str, Path]], readme_dir: Path, run: Run) -> str:
    lines = [
        f"Run on {run.started} by `.venv/bin/python benchmarks/run_all.py --readme README.md"
        f"{' --quick' if run.quick else ''}` (`make bench`), in {run.took_s / 60:.0f} min.",
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
    for caption, path in charts:
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
    p.add_argument("--plots", type=Path, default=ROOT / "docs" / "bench", help="where the SVG charts go [docs/bench]")
    p.add_argument("--only", help="run only these scripts, comma-separated (e.g. throughput.py)")
    args = p.parse_args()
    benches = [b for b in BENCHES if not args.only or b.script in args.only.split(",")]
    started, load_before, t0 = time.strftime("%Y-%m-%d %H:%M %Z"), load_average(), time.monotonic()
    results = [run_bench(bench, args.quick) for bench in benches]
    charts = plots(results, args.plots)
    readme_dir = (args.readme or ROOT / "README.md").resolve().parent
    section = report(results, charts, readme_dir, Run(started, time.monotonic() - t0, args.quick, load_before))
    print(section)
    if args.readme:
        rewrite_readme(args.readme, section)
        print(f"run_all: wrote the bench section of {args.readme}", file=sys.stderr)
    return 0 if all(r.status == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
