"""What a trial sends: a sample of the user's prompts, or the synthetic set.

From a prompts file (parquet or JSON lines, as `submit` reads it), at most SAMPLE_ROWS prompts, spread
evenly over the file; every trial sends the same ones, in the same order. Without a file, the synthetic
set: SYNTHETIC_ROWS questions of 12 to 120 words on a rotation of topics (`synthetic`), all different, so
that no trial is helped by the prefix cache more than another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from mvllmd.jobs.input import InputError, inspect, iter_batches

SAMPLE_ROWS = 20_000
SYNTHETIC_ROWS = 10_000
TOPICS = (
    "the history of bridges", "how vaccines are tested", "sorting algorithms", "the water cycle",
    "compound interest", "how a compiler works", "the rules of chess", "plate tectonics",
    "the causes of inflation", "how batteries store energy", "the French revolution", "prime numbers",
)  # fmt: skip
FILLER = "Give the reasons, an example, and what is often misunderstood about it."


@dataclass(frozen=True)
class Workload:
    prompts: list[Any]  # strings, or lists of {role, content} messages
    rows: int  # rows of the whole file (or the synthetic set): what the estimates are for
    path: str = ""  # "" for the synthetic set


def load(path: str, column: str) -> Workload:
    """The user's prompts, sampled; raise InputError saying what is wrong with the file. Blocking."""
    if not path:
        return Workload(synthetic(SYNTHETIC_ROWS), SYNTHETIC_ROWS)
    try:
        info = inspect(Path(path), column or "prompt")
        every = max(1, -(-info.num_rows // SAMPLE_ROWS))
        prompts = [
            prompt
            for batch in iter_batches(info)
            for offset, prompt in enumerate(batch.prompts)
            if (batch.start + offset) % every == 0 and prompt is not None
        ]
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: cannot be read ({exc})") from None
    if not prompts:
        raise InputError(f"{path}: no usable prompt in column {column or 'prompt'!r}")
    return Workload(prompts, info.num_rows, path)


def synthetic(rows: int) -> list[str]:
    return [
        f"Question {i}: explain {TOPICS[i % len(TOPICS)]} to a student. " + " ".join([FILLER] * (i % 8))
        for i in range(rows)
    ]
