"""The splits a sweep measures: N instances of TP devices each, using every chosen device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mvllmd.errors import InvalidRequest


@dataclass(frozen=True)
class Split:
    instances: int
    tp: int

    def __str__(self) -> str:
        return f"{self.instances} x TP{self.tp}"


def candidates(devices: int, most_tp: int) -> list[Split]:
    """Every N x TP split of `devices`, TP a power of two up to `most_tp` that divides them, smallest TP first."""
    found, tp = [], 1
    while tp <= min(devices, most_tp):
        if devices % tp == 0:
            found.append(Split(devices // tp, tp))
        tp *= 2
    return found


def checked(asked: Sequence[Split], devices: int, most_tp: int, word: str) -> list[Split]:
    """The splits asked for (--configs), each using all `devices` with a power-of-two TP; raise saying
    what is wrong with the first that does not."""
    if not asked:
        return candidates(devices, most_tp)
    seen: set[Split] = set()
    for split in asked:
        name = f"--configs {split.instances}x{split.tp}"
        if split.instances < 1 or split.tp < 1 or split.tp & (split.tp - 1):
            raise InvalidRequest(f"{name}: give INSTANCESxTP with TP a power of two, e.g. 4x2")
        if split.tp > most_tp:
            raise InvalidRequest(f"{name}: {word}s run TP {most_tp} at most")
        if split.instances * split.tp != devices:
            splits = ", ".join(f"{s.instances}x{s.tp}" for s in candidates(devices, most_tp))
            raise InvalidRequest(
                f"{name}: {split} takes {split.instances * split.tp} {word}s; a split uses all {devices} chosen "
                f"(INSTANCES x TP = {devices}: {splits})"
            )
        if split in seen:
            raise InvalidRequest(f"{name} is given twice")
        seen.add(split)
    return list(asked)
