"""An instance's log: its last lines, and new whole lines as they come (after a rotation too)."""

from __future__ import annotations

from pathlib import Path

from mvllmd.instances.logs import last_lines, read_from, read_log


def test_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    assert last_lines(log, 5) == (0, [])  # no log yet
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    assert last_lines(log, 3) == (log.stat().st_size, ["line 7", "line 8", "line 9"])
    assert last_lines(log, 0) == (log.stat().st_size, [])


def test_read_from_whole_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    log.write_text("a\nb\npart")
    position, lines = read_from(log, 0)
    assert (position, lines) == (4, ["a", "b"])
    with log.open("a") as f:
        f.write("ial\n")
    assert read_from(log, position) == (12, ["partial"])
    log.write_text("new\n")  # rotated: shorter than where we were
    assert read_from(log, 12) == (4, ["new"])


async def test_read_log_follows_while_alive(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    log.write_text("old 1\nold 2\n")
    alive = [True]
    chunks = read_log(log, tail=1, follow=True, alive=lambda: alive[0])
    assert await anext(chunks) == ["old 2"]
    with log.open("a") as f:
        f.write("new\n")
    assert await anext(chunks) == ["new"]
    alive[0] = False
    assert [chunk async for chunk in chunks] == []
