"""The weights a server serves, told apart by what they write: fingerprints, tags, provenance.

A checkpoint, to the simulator, is any directory that a reload names; the model a server starts with
is one when it is a directory that holds a config.json, as vLLM needs to start from a directory (so
`--model sim`, run where a directory `sim` happens to be, stays a name). Its fingerprint is 16 hex
digits of a hash over the directory's files, in the order of their names relative to it: each name,
size and content. Only the first 64 MiB of each file are read (a real checkpoint's shards run to
gigabytes; a test's files are small), so two checkpoints that differ only past that point of a file
of the same size look alike.

The tag of a fingerprint (0-14) marks every word made under those weights (text.py: `weights_tag`
reads it back from a word). Tag 15 marks words made from discarded weights: after a level-2 sleep
vLLM's GPU memory holds garbage until the caller reloads the weights, and the simulator answers with
words of tag 15 until then. A server started on a model name that is not a checkpoint has no
fingerprint: its words are the ones drawn without tags, as before tags existed.

`make_checkpoint(path, tag)` writes a checkpoint of a given tag, for tests. `Provenance` records which
weights made which token of one choice: a reload in the middle of an answer changes the tag of every
token made after it, not before.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mvllm_sim.text import Output, with_tag

CHECKPOINT_TAGS = 15  # tags 0-14 name checkpoints
DISCARDED_TAG = 15
HASHED_BYTES_PER_FILE = 64 * 1024 * 1024
_CHUNK = 1024 * 1024


class WeightsError(Exception):
    """Weights that cannot be loaded; the message is what vLLM's loader says in that case."""


def fingerprint(path: str | os.PathLike[str]) -> str:
    """The fingerprint of the checkpoint directory `path` (see the module docstring)."""
    root = Path(path)
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    digest = hashlib.blake2b(digest_size=8)
    for name, file in files:
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            left = HASHED_BYTES_PER_FILE
            while left > 0 and (chunk := f.read(min(_CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
    return digest.hexdigest()


def weights_tag_of(fingerprint: str) -> int:
    """The tag (0-14) that words made by the weights of this fingerprint carry."""
    return int(fingerprint, 16) % CHECKPOINT_TAGS


def is_model_checkpoint(model: str) -> bool:
    """Whether the model a server starts with is a checkpoint (see the module docstring)."""
    return os.path.isfile(os.path.join(model, "config.json"))


def make_checkpoint(path: str | os.PathLike[str], tag: int) -> Path:
    """Write a checkpoint directory at `path` (made if need be) whose weights tag is `tag`: a
    config.json, and a file `weights.bin` rewritten until the directory's fingerprint has that tag (15
    tries on average). It serves as --model or as a reload's weights_path."""
    if not 0 <= tag < CHECKPOINT_TAGS:
        raise ValueError(f"a checkpoint's tag is 0-{CHECKPOINT_TAGS - 1}, not {tag}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"architectures": ["MvllmSimForCausalLM"]}\n')
    salt = 0
    while True:
        (root / "weights.bin").write_bytes(f"mvllm-sim checkpoint {salt}\n".encode())
        if weights_tag_of(fingerprint(root)) == tag:
            return root
        salt += 1


def read_weights(source: str, model: str) -> str | None:
    """The fingerprint of the weights at `source`: a directory's, or None for `model` (the model the
    server started with) when that is not a checkpoint: its weights carry no tag. Anything else is
    not found, as vLLM's loader, which takes it for a Hugging Face repository id, finds it.
    Reads files: call it off the event loop."""
    if source == model and not is_model_checkpoint(model):
        return None
    if os.path.isdir(source):
        try:
            return fingerprint(source)
        except OSError as exc:
            raise WeightsError(str(exc)) from None
    raise WeightsError(
        f"Repo id must be in the form 'repo_name' or 'namespace/repo_name': '{source}'. "
        "Use `repo_type` argument if needed."
    )


@dataclass
class Weights:
    """The weights being served. `source` is where a reload without a path reads from: the model the
    server started with, then the last path a reload asked for, even one that failed (vLLM's
    model_config.model is set before it loads)."""

    model: str
    fingerprint: str | None
    source: str = field(init=False)
    discarded: bool = False  # a level-2 sleep dropped them; a reload brings weights back

    def __post_init__(self) -> None:
        self.source = self.model

    @property
    def tag(self) -> int | None:
        if self.discarded:
            return DISCARDED_TAG
        return None if self.fingerprint is None else weights_tag_of(self.fingerprint)


@dataclass
class Provenance:
    """Which weights made which token of one choice: (first token, tag) segments, in order. The words
    were generated under the first segment's tag, so they change only where a later segment begins;
    a None tag (no weights fingerprint) leaves the words as they were generated."""

    segments: list[tuple[int, int | None]]

    def switch(self, at: int, tag: int | None) -> None:
        """Tokens from number `at` on are made by weights of `tag`."""
        if self.segments[-1][1] != tag:
            self.segments.append((at, tag))

    def words(self, words: Sequence[str], start: int = 0, end: int | None = None) -> list[str]:
        """Tokens `start` to `end` of `words`, each as the weights that made it write it."""
        end = len(words) if end is None else end
        if len(self.segments) == 1:
            return list(words[start:end])
        out: list[str] = []
        bounds = [first for first, _ in self.segments[1:]] + [end]
        for (first, tag), stop in zip(self.segments, bounds, strict=True):
            lo, hi = max(first, start), min(stop, end)
            if lo < hi:
                out += words[lo:hi] if tag is None else [with_tag(w, tag) for w in words[lo:hi]]
        return out

    def output(self, out: Output) -> Output:
        """`out` with each word as the weights that made it wrote it."""
        return out if len(self.segments) == 1 else replace(out, words=tuple(self.words(out.words)))
