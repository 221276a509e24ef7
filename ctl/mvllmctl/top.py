"""`mvllmctl top`: a live view of the daemon, refreshed every second (DaemonService.GetOverview).

It shows each GPU's utilisation and memory (simulated GPUs carry a simulated reading), each server's
state, running and waiting sequences and tokens/s, each unfinished job's progress, rate and ETA, and
the front door's requests/s and errors.

Rates over the refresh interval are taken here, from two snapshots: their counters, and the daemon's
uptimes as the clock. The first frame (and --once) shows what one snapshot holds: the front door's
totals, and each job's average rate since its run began.

The view is drawn with curses: q (or Ctrl-C) quits and restores the terminal, exit 0. A daemon that
cannot be reached at start is an error (exit 3), as for every command. One that goes away later (a
restart, an upgrade: its instances and jobs carry on) leaves the last frame on screen under a banner
that says since when, and top keeps asking every interval until it answers again.
"""

from __future__ import annotations

import contextlib
import curses
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import click

from mvllm.v1 import daemon_pb2 as pb
from mvllm.v1 import daemon_pb2_grpc, instance_pb2, job_pb2
from mvllmctl.client import Client, CtlError
from mvllmctl.context import Ctl, json_option, pass_ctl
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.output import duration, print_json

BAR = 10  # the width of the memory and progress bars
KEY_WAIT_MS = 100  # how long the view waits for a key before it looks for a new snapshot
STALE_AFTER = 3  # intervals without a new snapshot before the header says how old it is

SIM_NOTE = "(sim-gpu: a simulated reading; memory: what its instances reserve; busy while they run sequences)"

Fetch = Callable[[], pb.GetOverviewResponse]


@click.command()
@click.option("--once", is_flag=True, help="Print one snapshot and exit (with --json: the RPC's response).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, metavar="SECONDS",
              help="Refresh every this many seconds.")  # fmt: skip
@json_option
@pass_ctl
def top(ctl: Ctl, once: bool, interval: float, as_json: bool) -> int:
    """A live view of GPUs, servers, jobs and the front door; q or Ctrl-C quits.

    GPUs: utilisation and memory (NVML; simulated GPUs show a simulated reading: the memory their
    instances reserve, busy while those run sequences). Servers: state, running and waiting sequences,
    tokens/s. Jobs: progress, samples/s and tokens/s, ETA. The front door: requests/s and errors.
    Rates are taken over the refresh interval (--once: totals, and the jobs' averages). A daemon that
    goes away while top runs is shown in a banner, and asked again every interval.
    """
    if as_json and not once:
        raise CtlError("--json prints one snapshot: use it with --once", ExitStatus.USAGE)
    fetch = _fetcher(ctl.client)
    if once:
        snapshot = fetch()
        if as_json:
            print_json(snapshot)
        else:
            width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
            for line in render(snapshot, None, width):
                click.echo(line.text)
        return ExitStatus.SUCCESS
    if not (sys.stdout.isatty() and sys.stdin.isatty()):
        raise CtlError("mvllmctl top draws on a terminal; pass --once (or --once --json) for one snapshot",
                       ExitStatus.USAGE)  # fmt: skip
    poller = Poller(fetch, interval, fetch())  # the first call outside curses: its error prints plainly
    poller.start()
    try:
        curses.wrapper(lambda screen: View(screen, poller, ctl.client.address).run())
    except KeyboardInterrupt:
        pass  # Ctrl-C quits, as q does; curses.wrapper has restored the terminal
    except curses.error as exc:
        raise CtlError(f"cannot draw on this terminal ({exc}); check $TERM, or pass --once", ExitStatus.FAILED) from exc
    finally:
        poller.stop()
    return ExitStatus.SUCCESS


def _fetcher(client: Client) -> Fetch:
    stub = daemon_pb2_grpc.DaemonServiceStub(client.channel())

    def fetch() -> pb.GetOverviewResponse:
        response: pb.GetOverviewResponse = client.call(stub.GetOverview, pb.GetOverviewRequest())
        return response

    return fetch


# --- asking the daemon ---------------------------------------------------------------------------------


class Poller(threading.Thread):
    """Asks for a snapshot every interval, in a thread of its own: a slow daemon never stalls the keys."""

    def __init__(self, fetch: Fetch, interval_s: float, first: pb.GetOverviewResponse) -> None:
        super().__init__(name="mvllmctl-top", daemon=True)  # a call in flight must not hold up quitting
        self.interval_s = interval_s
        self.changed = threading.Event()
        self._fetch = fetch
        self._lock = threading.Lock()
        self._latest: pb.GetOverviewResponse = first
        self._previous: pb.GetOverviewResponse | None = None
        self._received = time.monotonic()
        self._failure, self._failing_since = "", 0.0
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                snapshot = self._fetch()
            except CtlError as exc:
                self._failed(str(exc))
                continue
            except Exception as exc:  # never a traceback over the view
                self._failed(f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                self._previous, self._latest = self._latest, snapshot
                self._received, self._failure = time.monotonic(), ""
            self.changed.set()

    def stop(self) -> None:
        self._stopped.set()

    def state(self) -> tuple[pb.GetOverviewResponse, pb.GetOverviewResponse | None, float, str, float]:
        """The latest snapshot, the one before, when it came (monotonic), and the failure since then."""
        with self._lock:
            return self._latest, self._previous, self._received, self._failure, self._failing_since

    def _failed(self, why: str) -> None:
        with self._lock:
            if not self._failure:
                self._failing_since = time.monotonic()
            self._failure = why
        self.changed.set()


# --- the view -------------------------------------------------------------------------------------


class View:
    def __init__(self, screen: curses.window, poller: Poller, address: str) -> None:
        self._screen = screen
        self._poller = poller
        self._address = address
        self._drawn = 0.0

    def run(self) -> None:
        with contextlib.suppress(curses.error):
            curses.curs_set(0)
        self._screen.timeout(KEY_WAIT_MS)
        self._draw()
        while True:
            key = self._screen.getch()
            if key in (ord("q"), ord("Q")):
                return
            fresh = self._poller.changed.is_set()
            if fresh or key == curses.KEY_RESIZE or time.monotonic() - self._drawn >= 1.0:
                self._poller.changed.clear()
                self._draw()

    def _draw(self) -> None:
        latest, previous, received, failure, since = self._poller.state()
        now = time.monotonic()
        height, width = self._screen.getmaxyx()
        banner = ""
        if failure:
            every = f"{self._poller.interval_s:g}s"
            banner = f"NO ANSWER from mvllmd for {duration(now - since)}; asking every {every} (q quits): {failure}"
        elif now - received > STALE_AFTER * self._poller.interval_s:
            banner = f"mvllmd at {self._address} has not answered for {duration(now - received)}; still asking"
        lines = render(latest, previous, max(1, width - 1), banner)
        self._screen.erase()
        for y, line in enumerate(lines[:height]):
            with contextlib.suppress(curses.error):  # the last cell of the screen cannot be written
                self._screen.addnstr(y, 0, line.text, max(0, width - 1), STYLES[line.style]())
        self._screen.refresh()
        self._drawn = now


STYLES: dict[str, Callable[[], int]] = {
    "": lambda: curses.A_NORMAL,
    "title": lambda: curses.A_BOLD,
    "header": lambda: curses.A_UNDERLINE,
    "alert": lambda: curses.A_REVERSE | curses.A_BOLD,
}


# --- one frame, as lines -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    text: str
    style: str = ""  # "", "title", "header" (a table's) or "alert"


def render(
    now: pb.GetOverviewResponse, before: pb.GetOverviewResponse | None, width: int | None, banner: str = ""
) -> list[Line]:
    """One frame: `before` (the previous snapshot) gives the rates; every line cut to `width` (None: not cut)."""
    elapsed = now.uptime_seconds - before.uptime_seconds if before is not None else 0.0
    lines = [Line(_title(now), "title")]
    if banner:
        lines.append(Line(banner, "alert"))
    lines += _door(now.front_door, before.front_door if elapsed > 0 and before else None, elapsed)
    lines += [Line(""), *_gpus(now)]
    lines += [Line(""), *_servers(now)]
    lines += [Line(""), *_jobs(now, before if elapsed > 0 else None, elapsed)]
    return [Line(line.text[:width] if width is not None else line.text, line.style) for line in lines]


def _title(now: pb.GetOverviewResponse) -> str:
    taken = now.taken_at.ToDatetime().astimezone().strftime("%H:%M:%S")
    return f"mvllmd {now.version} on {now.hostname}   up {duration(now.uptime_seconds)}   {taken}   (q quits)"


def _door(door: pb.OverviewFrontDoor, before: pb.OverviewFrontDoor | None, elapsed: float) -> list[Line]:
    if not door.urls:
        return [Line("front door  off")]
    requests, errors = f"{door.requests_total:,}", f"{door.errors_total:,}"
    if before is not None:
        requests = f"{_rate(door.requests_total - before.requests_total, elapsed)} ({requests} in all)"
        errors = f"{_rate(door.errors_total - before.errors_total, elapsed)} ({errors} in all)"
    counts = f"in flight {door.inflight:,}   retries {door.retries_total:,}"
    return [Line(f"front door  {', '.join(door.urls)}   requests {requests}   errors {errors}   {counts}")]


def _gpus(now: pb.GetOverviewResponse) -> list[Line]:
    if not now.gpus:
        return [Line("no GPUs (none read through NVML, and no --sim-gpus)")]
    rows = [
        [
            f"{_kind(g.kind)}:{g.index}",
            f"{g.utilization * 100:.0f}%",
            _bar(g.memory_used_bytes / g.memory_total_bytes if g.memory_total_bytes else 0.0),
            f"{g.memory_used_bytes / 2**30:.1f}/{g.memory_total_bytes / 2**30:.1f}",
            ",".join(g.instances) or "-",
            g.name,
        ]
        for g in now.gpus
    ]
    lines = _table(["GPU", "UTIL", "MEMORY", "USED/TOTAL GiB", "INSTANCES", "NAME"], rows)
    if any(g.kind == pb.DEVICE_KIND_SIM_GPU for g in now.gpus):
        lines.append(Line(SIM_NOTE))
    return lines


def _servers(now: pb.GetOverviewResponse) -> list[Line]:
    if not now.servers:
        return [Line("no servers (mvllmctl launch, mvllmctl attach)")]
    rows = []
    for s in now.servers:
        read = s.gauges in (pb.GAUGE_SOURCE_ENDPOINT_TABLE, pb.GAUGE_SOURCE_SCRAPED)
        state = instance_pb2.InstanceState.Name(s.state).removeprefix("INSTANCE_STATE_").lower()
        gauges = [str(s.running), str(s.waiting), f"{s.tokens_per_second:,.0f}"] if read else ["-", "-", "-"]
        inflight = f"{s.inflight}" + (f" ({s.door_inflight} door)" if s.door_inflight else "")
        rows.append([s.name, s.engine, state, s.model, *gauges, str(s.max_num_seqs), inflight])
    headers = ["SERVER", "ENGINE", "STATE", "MODEL", "RUNNING", "WAITING", "TOKENS/S", "MAX SEQS", "OURS"]
    return _table(headers, rows)


def _jobs(now: pb.GetOverviewResponse, before: pb.GetOverviewResponse | None, elapsed: float) -> list[Line]:
    if not now.jobs:
        return [Line("no jobs running or queued")]
    earlier = {j.id: j for j in before.jobs} if before is not None else {}
    rows = []
    for j in now.jobs:
        state = job_pb2.JobState.Name(j.state).removeprefix("JOB_STATE_").lower()
        done = j.samples_done / j.samples_total if j.samples_total else 0.0
        was = earlier.get(j.id)
        if was is not None and j.state == job_pb2.JOB_STATE_RUNNING:
            samples = _rate(j.samples_done - was.samples_done, elapsed)
            tokens = _rate(j.completion_tokens - was.completion_tokens, elapsed)
        else:  # one snapshot: the run's averages
            samples, tokens = f"{j.samples_per_second:,.1f}/s", f"{j.tokens_per_second:,.0f}/s"
        eta = duration(j.eta_seconds) if j.eta_seconds > 0 else "-"
        rows.append([j.id, state, j.model, f"{_bar(done)} {done * 100:3.0f}%",
                     f"{j.samples_done:,}/{j.samples_total:,}", samples, tokens, eta, f"{j.errors:,}"])  # fmt: skip
    return _table(["JOB", "STATE", "MODEL", "PROGRESS", "DONE/TOTAL", "SAMPLES/S", "TOKENS/S", "ETA", "ERRORS"], rows)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[Line]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip()

    return [Line(line(headers), "header"), *(Line(line(r)) for r in rows)]


def _rate(delta: float, elapsed: float) -> str:
    per_s = max(0.0, delta) / elapsed
    return f"{per_s:,.1f}/s" if per_s < 100 else f"{per_s:,.0f}/s"


def _bar(share: float) -> str:
    filled = round(max(0.0, min(1.0, share)) * BAR)
    return "[" + "#" * filled + "." * (BAR - filled) + "]"


def _kind(kind: int) -> str:
    return pb.DeviceKind.Name(kind).removeprefix("DEVICE_KIND_").lower().replace("_", "-")
