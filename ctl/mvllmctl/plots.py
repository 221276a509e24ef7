"""Pictures of measurements: `mvllmctl tune --plot`'s sweep and the benchmarks' charts, drawn with matplotlib.

matplotlib is the `bench` extra (`pip install 'mvllm[bench]'`), not a dependency of mvllm: it is imported
inside the drawing functions, so that mvllmctl runs without it, and a drawing without it raises
PlotUnavailable. Figures are made with matplotlib's object API on the Agg canvas: no pyplot, no global
state, no display. Each drawing writes a PNG of exactly the size asked for, or an SVG when the path ends
in `.svg`; a path that cannot be written raises the OSError that writing it raised.

    draw_sweep       one bar per tensor-parallel split, its spread as an error bar, the best one marked
    draw_timelines   sequences running on each server over time, one panel per policy
    draw_dp_vs_tp    output tokens/s per layout, each one's speedup over 1 x TP8
    draw_bars        horizontal bars, one value per label
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_HINT = "--plot needs matplotlib: pip install 'mvllm[bench]'"
DPI = 100
SIZE = (900, 500)  # pixels, for a one-panel chart
TIMELINE_SIZE = (1200, 450)

INK, MUTED, GRID = "#222222", "#777777", "#dddddd"
BAR, BEST, BASE = "#4878a8", "#d55e00", "#999999"
# Colour-blind safe (Okabe and Ito), one per server, the same server the same colour in every panel.
SERVER_COLOURS = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")

Points = Sequence[tuple[float, float]]
"""(time s, sequences running) samples of one server, in time order."""
Timelines = Mapping[str, Mapping[str, Points]]
"""One panel per key (a policy's run), each one line per server: panel -> server name -> points."""


class PlotUnavailable(Exception):
    """matplotlib cannot be imported: mvllm was installed without its `bench` extra."""

    def __init__(self, message: str = INSTALL_HINT) -> None:
        super().__init__(message)


@dataclass(frozen=True)
class SplitBar:
    """One split of a sweep: its throughput and spread, or a note saying why it was not measured."""

    label: str  # e.g. "8 x TP1"
    tokens_per_s: float
    low: float  # the spread (e.g. lowest and highest steady interval)
    high: float
    note: str = ""  # e.g. "does not fit", "not tried": the split was not measured
    best: bool = False


@dataclass(frozen=True)
class LayoutBar:
    """One layout of the DP-vs-TP benchmark."""

    instances: int
    tp: int
    tokens_per_s: float

    @property
    def label(self) -> str:
        return f"{self.instances} x TP{self.tp}"


# --- the drawings --------------------------------------------------------------------------------


def draw_sweep(bars: Sequence[SplitBar], path: Path, title: str, unit: str = "output tokens/s", *,
               size: tuple[int, int] = SIZE) -> None:  # fmt: skip
    """One bar per split, in the given order, from low to high as an error bar, the best one marked;
    a split with a note is an empty hatched slot that says the note."""
    fig = _figure(size)
    ax = fig.add_subplot()
    measured = [b for b in bars if not b.note]
    top = max((max(b.tokens_per_s, b.high) for b in measured), default=0.0) * 1.18 or 1.0
    for x, bar in enumerate(bars):
        if bar.note:
            _empty_slot(ax, x, top, bar.note)
        else:
            _split_bar(ax, x, bar, top)
    ax.set_xticks(range(len(bars)), [b.label for b in bars], rotation=30 if len(bars) > 6 else 0,
                  ha="right" if len(bars) > 6 else "center")  # fmt: skip
    ax.set_xlim(-0.6, max(len(bars), 1) - 0.4)
    ax.set_ylim(0, top)
    _style(ax, title, unit)
    _sweep_legend(fig, measured, len(measured) < len(bars))
    _save(fig, path)


def draw_timelines(panels: Timelines, path: Path, title: str, xlabel: str = "time (s)", *,
                   size: tuple[int, int] = TIMELINE_SIZE) -> None:  # fmt: skip
    """One panel per key of PANELS, side by side on one time axis and one sequences axis; in each, one
    line per server (sequences running over time), the same server the same colour throughout."""
    fig = _figure(size)
    axes = fig.subplots(1, max(len(panels), 1), sharex=True, sharey=True, squeeze=False)[0]
    colours = _server_colours(panels)
    for ax, (name, servers) in zip(axes, panels.items(), strict=False):
        for server, points in servers.items():
            ax.plot([t for t, _ in points], [n for _, n in points], color=colours[server], linewidth=1.1,
                    label=server)  # fmt: skip
        _style(ax, name, "sequences running" if ax is axes[0] else "")
        ax.set_xlabel(xlabel)
    # One scale for all panels (they share their axes), from every panel's points.
    points = [point for servers in panels.values() for line in servers.values() for point in line]
    axes[0].set_xlim(0, max((t for t, _ in points), default=0.0) * 1.02 or 1.0)
    axes[0].set_ylim(0, max((n for _, n in points), default=0.0) * 1.06 or 1.0)
    fig.suptitle(title, color=INK)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", frameon=False, title="server")
    _save(fig, path)


def draw_dp_vs_tp(layouts: Sequence[LayoutBar], path: Path, title: str, unit: str = "output tokens/s", *,
                  size: tuple[int, int] = SIZE) -> None:  # fmt: skip
    """One bar per layout, each marked with its speedup over 1 x TP8 (the last layout if none is)."""
    fig = _figure(size)
    ax = fig.add_subplot()
    base = next((lay for lay in layouts if (lay.instances, lay.tp) == (1, 8)), layouts[-1] if layouts else None)
    top = max((lay.tokens_per_s for lay in layouts), default=0.0) * 1.2 or 1.0
    for x, lay in enumerate(layouts):
        ax.bar(x, lay.tokens_per_s, 0.6, color=BASE if lay is base else BAR)
        ax.text(x, lay.tokens_per_s + top * 0.015, f"{lay.tokens_per_s:,.0f}", ha="center", va="bottom", color=INK)
        if base is not None and base.tokens_per_s > 0:
            speedup = lay.tokens_per_s / base.tokens_per_s
            ax.text(x, lay.tokens_per_s / 2, f"{speedup:.2f}x", ha="center", va="center", color="white",
                    fontsize=13, fontweight="bold")  # fmt: skip
    if base is not None:
        ax.axhline(base.tokens_per_s, color=BASE, linestyle="--", linewidth=1, zorder=0)
    ax.set_xticks(range(len(layouts)), [lay.label for lay in layouts])
    ax.set_ylim(0, top)
    subtitle = f"\n(in each bar: its speedup over {base.label})" if base is not None else ""
    _style(ax, title + subtitle, unit)
    _save(fig, path)


def draw_bars(bars: Sequence[tuple[str, float]], path: Path, title: str, unit: str, *,
              size: tuple[int, int] = SIZE) -> None:  # fmt: skip
    """Horizontal bars, one per (label, value), the first on top, each with its value written."""
    fig = _figure(size)
    from matplotlib.ticker import StrMethodFormatter  # noqa: PLC0415

    ax = fig.add_subplot()
    right = max((v for _, v in bars), default=0.0) * 1.15 or 1.0
    for y, (_, value) in enumerate(bars):
        ax.barh(y, value, 0.6, color=BAR)
        ax.text(value + right * 0.01, y, f"{value:,.0f}", va="center", color=INK)
    _style(ax, title, "")
    ax.set_yticks(range(len(bars)), [label for label, _ in bars])  # after _style: its number format is for values
    ax.invert_yaxis()
    ax.set_xlim(0, right)
    ax.set_xlabel(unit)
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.grid(axis="x", color=GRID)
    ax.grid(axis="y", visible=False)
    _save(fig, path)


# --- parts ---------------------------------------------------------------------------------------


def _figure(size: tuple[int, int]) -> Figure:
    """A figure SIZE pixels large on the Agg canvas; PlotUnavailable without matplotlib."""
    try:
        import matplotlib  # noqa: F401, PLC0415  (the top package first: a stubbed-out one must fail here)
    except ImportError as e:
        raise PlotUnavailable from e
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    width, height = size
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    if Path(path).suffix.lower() == ".svg":
        # No date and fixed ids: the same drawing, the same file (a redrawn chart does not churn in git).
        with matplotlib.rc_context({"svg.hashsalt": "mvllm"}):
            fig.savefig(path, format="svg", metadata={"Date": None})
    else:
        _save_png(fig, path)


def _save_png(fig: Figure, path: Path) -> None:
    """The figure as a PNG of 256 colours: a third of the size of matplotlib's RGBA one, the same to the eye
    (a chart has few colours besides its lines' antialiased edges), so that the README's pictures stay small."""
    from PIL import Image  # noqa: PLC0415  (a dependency of matplotlib)

    raw = io.BytesIO()
    fig.savefig(raw, format="rgba", dpi=DPI)
    width, height = (round(inches * DPI) for inches in fig.get_size_inches())
    image = Image.frombytes("RGBA", (width, height), raw.getvalue())
    image.convert("RGB").quantize(256).save(path, format="PNG", optimize=True, dpi=(DPI, DPI))


def _style(ax: Axes, title: str, ylabel: str) -> None:
    from matplotlib.ticker import StrMethodFormatter  # noqa: PLC0415

    ax.set_title(title, color=INK)
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", color=GRID)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _split_bar(ax: Axes, x: int, bar: SplitBar, top: float) -> None:
    below, above = max(0.0, bar.tokens_per_s - bar.low), max(0.0, bar.high - bar.tokens_per_s)
    ax.bar(x, bar.tokens_per_s, 0.65, color=BEST if bar.best else BAR, yerr=[[below], [above]], capsize=6,
           error_kw={"ecolor": INK, "elinewidth": 1.2})  # fmt: skip
    text = f"{bar.tokens_per_s:,.0f}" + ("\nbest" if bar.best else "")
    ax.text(x, max(bar.tokens_per_s, bar.high) + top * 0.015, text, ha="center", va="bottom", color=INK,
            fontweight="bold" if bar.best else "normal")  # fmt: skip


def _empty_slot(ax: Axes, x: int, top: float, note: str) -> None:
    ax.bar(x, top, 0.65, fill=False, hatch="///", edgecolor=GRID, linewidth=0)
    ax.text(x, top / 2, note, rotation=90, ha="center", va="center", color=MUTED,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 2})  # fmt: skip


def _sweep_legend(fig: Figure, measured: Sequence[SplitBar], any_empty: bool) -> None:
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    handles: list[Patch | Line2D] = [Patch(color=BAR, label="measured")]
    if any(b.best for b in measured):
        handles.append(Patch(color=BEST, label="best"))
    handles.append(Line2D([], [], color=INK, marker="_", markersize=10, linestyle="-", label="spread (low to high)"))
    if any_empty:
        handles.append(Patch(fill=False, hatch="///", edgecolor=MUTED, label="not measured"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize="small")


def _server_colours(panels: Timelines) -> dict[str, str]:
    names = list(dict.fromkeys(server for servers in panels.values() for server in servers))
    return {name: SERVER_COLOURS[i % len(SERVER_COLOURS)] for i, name in enumerate(names)}
