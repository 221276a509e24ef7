"""mvllmctl.plots: each drawing writes a PNG of the size asked for (read back by its IHDR and by matplotlib's
image reader), an SVG when the path ends in .svg, PlotUnavailable when matplotlib cannot be imported, and
the OSError of a path that cannot be written. mvllmctl imports without matplotlib."""

from __future__ import annotations

import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from mvllmctl.plots import (
    BEST,
    INSTALL_HINT,
    SERVER_COLOURS,
    LayoutBar,
    PlotUnavailable,
    SplitBar,
    draw_bars,
    draw_dp_vs_tp,
    draw_sweep,
    draw_timelines,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SWEEP = [
    SplitBar("8 x TP1", 113_000, 108_000, 116_000),
    SplitBar("4 x TP2", 114_000, 110_000, 118_500, best=True),
    SplitBar("2 x TP4", 93_000, 91_000, 95_000),
    SplitBar("1 x TP8", 0, 0, 0, note="does not fit"),
]
TIMELINES = {
    policy: {f"s{i} (speed {speed:g})": [(t / 10, min(256.0, t * speed) + 20 * i) for t in range(300)]
             for i, speed in enumerate((1, 1, 0.5, 0.25))}
    for policy in ("round-robin: 269 s", "least-loaded: 96 s")
}  # fmt: skip
LAYOUTS = [LayoutBar(8, 1, 113_359), LayoutBar(4, 2, 113_978), LayoutBar(2, 4, 93_586), LayoutBar(1, 8, 62_908)]

Draw = Callable[[Path], None]
DRAWINGS: dict[str, Draw] = {
    "sweep": lambda path: draw_sweep(SWEEP, path, "tune: llama-3.1-8b on 8 GPUs"),
    "timelines": lambda path: draw_timelines(TIMELINES, path, "balance", "time (simulated s)"),
    "dp_vs_tp": lambda path: draw_dp_vs_tp(LAYOUTS, path, "DP vs TP"),
    "bars": lambda path: draw_bars([("mvllmd", 1999.0), ("in-process", 2313.0)], path, "throughput", "samples/s"),
}


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def has_colour(path: Path, colour: str) -> bool:
    """Whether some pixel of the PNG at PATH is exactly COLOUR (#rrggbb)."""
    from matplotlib.image import imread

    pixels = (imread(path)[:, :, :3] * 255).round().astype(int)
    return bool((pixels == rgb(colour)).all(axis=2).any())


@pytest.mark.parametrize("name", DRAWINGS)
def test_each_drawing_writes_a_png(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    DRAWINGS[name](path)
    from matplotlib.image import imread

    width, height = png_size(path)
    assert width > 0 and height > 0
    assert imread(path).shape[:2] == (height, width)


@pytest.mark.parametrize("size", [(640, 360), (1200, 450)])
def test_the_png_has_the_size_asked_for(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "sweep.png"
    draw_sweep(SWEEP, path, "sweep", size=size)
    assert png_size(path) == size
    draw_timelines(TIMELINES, path, "balance", size=size)
    assert png_size(path) == size
    draw_dp_vs_tp(LAYOUTS, path, "DP vs TP", size=size)
    assert png_size(path) == size


def test_defaults_sizes(tmp_path: Path) -> None:
    DRAWINGS["sweep"](tmp_path / "a.png")
    DRAWINGS["timelines"](tmp_path / "b.png")
    assert png_size(tmp_path / "a.png") == (900, 500)
    assert png_size(tmp_path / "b.png") == (1200, 450)


@pytest.mark.parametrize("name", DRAWINGS)
def test_an_svg_path_gets_an_svg(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.svg"
    DRAWINGS[name](path)
    assert not path.read_bytes().startswith(PNG_SIGNATURE)
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


WORDS = {
    "sweep": ["8 x TP1", "4 x TP2", "1 x TP8", "does not fit", "114,000", "best", "not measured", "output tokens/s"],
    "timelines": ["round-robin: 269 s", "least-loaded: 96 s", "s0 (speed 1)", "s3 (speed 0.25)", "sequences running",
                  "time (simulated s)", "balance"],
    "dp_vs_tp": ["8 x TP1", "1 x TP8", "113,978", "1.81x", "1.00x", "speedup over 1 x TP8"],
    "bars": ["mvllmd", "in-process", "2,313", "samples/s", "throughput"],
}  # fmt: skip


@pytest.mark.parametrize("name", DRAWINGS)
def test_the_drawings_say_what_they_show(tmp_path: Path, name: str) -> None:
    """Labels, values and notes are in the picture (an SVG that keeps its text as text)."""
    import matplotlib

    path = tmp_path / f"{name}.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        DRAWINGS[name](path)
    texts = ["".join(t.itertext()) for t in ET.parse(path).getroot().iter("{http://www.w3.org/2000/svg}text")]
    joined = "\n".join(texts)
    for word in WORDS[name]:
        assert word in joined, (word, texts)


def test_svg_is_the_same_file_for_the_same_drawing(tmp_path: Path) -> None:
    """No date in it: a redrawn chart does not change in git when its numbers do not."""
    DRAWINGS["sweep"](tmp_path / "a.svg")
    DRAWINGS["sweep"](tmp_path / "b.svg")
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()


def test_the_best_split_is_highlighted(tmp_path: Path) -> None:
    draw_sweep(SWEEP, tmp_path / "best.png", "sweep")
    assert has_colour(tmp_path / "best.png", BEST)
    plain = [SplitBar(b.label, b.tokens_per_s, b.low, b.high, b.note) for b in SWEEP]
    draw_sweep(plain, tmp_path / "plain.png", "sweep")
    assert not has_colour(tmp_path / "plain.png", BEST)


def test_sweep_without_measurements_draws(tmp_path: Path) -> None:
    """Every split refused, or none at all: still a picture, not an error."""
    draw_sweep([SplitBar("1 x TP8", 0, 0, 0, note="not tried")], tmp_path / "none.png", "sweep")
    draw_sweep([], tmp_path / "empty.png", "sweep")
    assert png_size(tmp_path / "none.png") == png_size(tmp_path / "empty.png") == (900, 500)


def test_a_spread_outside_the_value_is_drawn(tmp_path: Path) -> None:
    """low above or high below the value (a caller's rounding): no negative error bar, no error."""
    draw_sweep([SplitBar("8 x TP1", 100, 120, 90)], tmp_path / "odd.png", "sweep")
    assert png_size(tmp_path / "odd.png") == (900, 500)


def test_each_server_has_a_colour_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "timelines.png"
    draw_timelines(TIMELINES, path, "balance")
    for colour in SERVER_COLOURS[:4]:
        assert has_colour(path, colour)


@pytest.mark.parametrize("name", DRAWINGS)
def test_without_matplotlib_plot_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    path = tmp_path / f"{name}.png"
    with pytest.raises(PlotUnavailable) as caught:
        DRAWINGS[name](path)
    assert str(caught.value) == INSTALL_HINT == "--plot needs matplotlib: pip install 'mvllm[bench]'"
    assert not path.exists()


def test_mvllmctl_imports_without_matplotlib() -> None:
    """The module (and the CLI) import matplotlib only when they draw."""
    code = (
        "import sys; import mvllmctl.plots, mvllmctl.cli; "
        "sys.exit(1 if any(m == 'matplotlib' or m.startswith('matplotlib.') for m in sys.modules) else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", DRAWINGS)
def test_a_path_that_cannot_be_written_raises_oserror(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError):
        DRAWINGS[name](tmp_path / "no such folder" / "chart.png")
    (tmp_path / "a folder.png").mkdir()
    with pytest.raises(OSError, match=r"a folder\.png"):
        DRAWINGS[name](tmp_path / "a folder.png")
