"""An instance's log (its engine's stdout and stderr): the last lines, and new ones as they come."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

FOLLOW_INTERVAL_S = 0.25


async def read_log(path: Path, tail: int, follow: bool, alive: Callable[[], bool]) -> AsyncIterator[list[str]]:
    """The last `tail` lines; then, when following, new whole lines while `alive()` says so."""
    position, lines = last_lines(path, tail)
    if lines:
        yield lines
    while follow and alive():
        await asyncio.sleep(FOLLOW_INTERVAL_S)
        position, lines = read_from(path, position)
        if lines:
            yield lines


def last_lines(path: Path, count: int) -> tuple[int, list[str]]:
    """The last `count` lines of a log, and the offset its end is at."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * max(count, 1)))
            data = f.read()
    except FileNotFoundError:
        return 0, []
    lines = data.decode(errors="replace").splitlines()
    return size, lines[-count:] if count else []


def read_from(path: Path, position: int) -> tuple[int, list[str]]:
    """The whole lines after `position`, and the offset after them (from the start if it was rotated)."""
    try:
        with path.open("rb") as f:
            if f.seek(0, os.SEEK_END) < position:
                position = 0  # rotated
            f.seek(position)
            data = f.read()
    except FileNotFoundError:
        return position, []
    end = data.rfind(b"\n") + 1  # whole lines only; the rest waits for its newline
    return position + end, data[:end].decode(errors="replace").splitlines()
