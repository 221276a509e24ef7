"""The simulator's tokenizer and its deterministic output.

Tokenizer: a token is a special token such as `<|im_start|>`, a run of word characters, or a single
other non-space character (regex `<\\|\\w+\\|>|\\w+|[^\\w\\s]`). "Hello, world!" is 4 tokens:
Hello , world !. A token's id is crc32(token) mod 32000, so ids are stable across runs and machines.

Chat prompts are rendered as `<|im_start|> role content <|im_end|>` per message, plus
`<|im_start|> assistant` for the reply: 2 + pieces(role) + pieces(content) tokens per message, plus 2.

Output: each choice's length and words are drawn from random.Random seeded with a hash of the prompt
and, for a seeded request, seed + choice index (vLLM's seed of choice i), else the request's number
on this server and the choice index: output is deterministic for a given order of requests, and two
unseeded requests for one prompt get different answers, as from vLLM.
Lengths are log-normal (median exp(mu), spread sigma), capped by max_tokens and the context left.

Continuations: a prompt that ends with p tokens of the simulator's own output (its words, read by
their token ids) continues an answer of p tokens, as a model reads its own answer so far: the length
drawn is the log-normal's conditioned on exceeding p, less p. A client that moves a running sample
to another server, with the tokens it made as the new prompt, so gets the rest of one answer, whose
whole length has the distribution of an answer made in one request.

Weights tags: a server that serves a checkpoint directory (see weights.py) marks every word with the
weights that made it. A word's index in the 1,024-word list is drawn as without weights; its low four
bits are then replaced by the weights' tag (0-15), so `weights_tag(word)` reads the tag back from the
word alone, token by token, and lengths never depend on the weights. Without a checkpoint nothing is
replaced: the output is the same as before tags existed (and its words' tags are meaningless).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import statistics
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

VOCAB_SIZE = 32000
_PIECE = re.compile(r"<\|\w+\|>|\w+|[^\w\s]")
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su", "da", "fi", "go", "hu", "ja", "we")
WORDS = tuple(a + b + c for a in _SYLLABLES for b in _SYLLABLES for c in ("", "n", "s", "r"))  # 1,024 words
TAGS = 16  # weights tags: the low four bits of a word's index
_INDEX = {w: i for i, w in enumerate(WORDS)}
_NORMAL = statistics.NormalDist()


def pieces(text: str) -> list[str]:
    return _PIECE.findall(text)


def token_ids(text: str) -> list[int]:
    return [zlib.crc32(p.encode()) % VOCAB_SIZE for p in pieces(text)]


def weights_tag(word: str) -> int:
    """The weights tag a word carries (KeyError for a word the simulator cannot make)."""
    return _INDEX[word] % TAGS


def with_tag(word: str, tag: int) -> str:
    """The word of the same draw made by weights of tag `tag`."""
    return WORDS[_INDEX[word] - _INDEX[word] % TAGS + tag]


def answer_so_far(ids: Sequence[int]) -> int:
    """How many of the prompt's last tokens are the simulator's own output: the answer it continues."""
    count = 0
    for token in reversed(ids):
        if token not in _ID_WORDS:
            break
        count += 1
    return count


def chat_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """The chat template as plain text; its pieces are its tokens (see the module docstring)."""
    parts = [f"<|im_start|> {role} {content} <|im_end|>" for role, content in messages]
    return " ".join([*parts, "<|im_start|> assistant"])


@dataclass(frozen=True)
class LengthModel:
    mu: float = 5.3  # median exp(5.3) ~ 200 tokens
    sigma: float = 0.8


def sample_key(prompt: str, index: int, seed: int | None, request: int) -> int:
    """Choice `index` of a request. Seeded, as vLLM does it: choice i draws with seed + i alone, so the
    same seed gives the same output whichever request (and n) it came in. Unseeded, each request draws
    anew (`request` numbers the server's requests), as vLLM does: two requests for one prompt differ."""
    part = f"seed {seed + index}" if seed is not None else f"request {request} choice {index}"
    digest = hashlib.blake2b(f"{part}\x00{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class Output:
    words: tuple[str, ...]
    finish_reason: str  # "stop" (the model ended, or a stop string) or "length"
    continued: bool = False  # it continues an answer the prompt ends with

    @property
    def text(self) -> str:
        return " ".join(self.words)


def generate(  # noqa: PLR0917
    key: int,
    lengths: LengthModel,
    cap: int,
    ignore_eos: bool,
    stop: Sequence[str] = (),
    made: int = 0,
    tag: int | None = None,
) -> Output:
    """The output of one choice: its words and why it ended. One word is one token. `made`: the
    tokens of the answer the prompt already holds; `tag`: the weights' tag, None without weights (see
    the module docstring). Stop strings are matched against the tagged words."""
    rng = random.Random(key)
    if made:
        below = _NORMAL.cdf((math.log(made) - lengths.mu) / lengths.sigma)  # P(an answer ends within `made`)
        z = _NORMAL.inv_cdf(min(below + rng.random() * (1 - below), 1 - 1e-12))
        natural = max(1, round(math.exp(lengths.mu + lengths.sigma * z)) - made)
    else:
        natural = max(1, round(rng.lognormvariate(lengths.mu, lengths.sigma)))
    length = cap if ignore_eos else min(natural, cap)
    words = tuple(rng.choices(WORDS, k=length))
    if tag is not None:
        words = tuple(with_tag(w, tag) for w in words)
    reason = "stop" if length < cap else "length"
    if stop:
        words, reason = _apply_stop(words, stop, reason)
    return Output(words, reason, continued=made > 0)


_ID_WORDS = {zlib.crc32(w.encode()) % VOCAB_SIZE: w for w in WORDS}  # ids two words share: the last


def detokenize(ids: Sequence[int]) -> str:
    """The text of token ids the simulator generated (its words, a space between); an id it cannot
    have generated reads as <id>."""
    return " ".join(_ID_WORDS.get(i, f"<{i}>") for i in ids)


def _apply_stop(words: tuple[str, ...], stop: Sequence[str], reason: str) -> tuple[tuple[str, ...], str]:
    text = " ".join(words)
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    if cut < 0:
        return words, reason
    kept = text[:cut].split()
    return tuple(kept), "stop"
