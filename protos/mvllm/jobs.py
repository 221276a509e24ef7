"""The job model: what a rollout job is, in the terms mvllmd, mvllmctl and any other client share.

A `JobSpec` is what the user asks for (the API's `mvllm.v1.JobSpec`, in Python values): the input and
output, the samples per prompt, the model, the `Sampling` parameters, how to dispatch, which servers.
`validate` is the one place a spec is checked before it is accepted: mvllmctl calls it on its flags
before it submits, the daemon on what it receives. A `JobRecord` is a job as the daemon keeps it: its
spec, state, counts and times. A `Sample` is one row of a job's output.

The spec's JSON (`JobSpec.to_json`, `JobSpec.from_json`) is what the daemon stores; `from_json` also
reads the previous release's form, whose model sat inside the sampling parameters.

This module imports nothing of the project, only the standard library: the daemon's engine, the API's
stubs and the command line all depend on it, never the other way round.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

MAX_SAMPLES = 1 << 16  # samples per prompt are below this: the output's sort key keeps 16 bits for them
MAX_SHARDS = 1_000_000
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_TEMPERATURE = 100.0
SEED_LIMIT = 2**63  # seeds are from 0 to SEED_LIMIT - 1 (the API's int64)

_E = TypeVar("_E", bound=enum.StrEnum)


class InvalidSpec(ValueError):
    """A job spec that can never run as written. The message names the flag to change (mvllmctl's)."""


class Policy(enum.StrEnum):
    """How a job's samples are spread over its servers (see the README's "Dispatch")."""

    LEAST_LOADED = "least-loaded"
    ROUND_ROBIN = "round-robin"


class OnError(enum.StrEnum):
    """What a sample that fails for good does: written with its `error` (the job goes on), or fails the job."""

    RECORD = "record"
    FAIL = "fail"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class Sampling:
    """The sampling parameters of every request of a job (the model is the spec's)."""

    max_tokens: int | None = None  # None: the server's default
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: no seed is sent
    logprobs: int | None = None  # the top-N token logprobs of each sample; None: none
    return_token_ids: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body


@dataclass(frozen=True)
class JobSpec:
    """A job as asked for; the API's JobSpec. Paths are on the daemon's host."""

    input_path: Path
    output_path: Path
    prompt_column: str = "prompt"
    num_samples: int = 1
    model: str = ""  # empty: the only model served by the targets
    sampling: Sampling = field(default_factory=Sampling)
    policy: Policy = Policy.LEAST_LOADED
    max_concurrent: int = 0  # samples in flight at most; 0: the daemon's default
    endpoints: tuple[str, ...] = ()  # servers the daemon does not run; empty: its READY instances
    wait_for_instances_s: float = 0.0
    on_error: OnError = OnError.RECORD
    resume: bool = False
    overwrite: bool = False
    endpoint_api_key: str = field(default="", repr=False)  # for the endpoints; never shown, never logged
    hedge: bool = True  # least-loaded: move or copy slow work in the tail
    weight_version: str = ""  # only servers at this version of the weights (weights/); empty: any
    shard_index: int = 0  # the job takes every shard_count-th prompt from the shard_index-th (0-based)
    shard_count: int = 1

    def in_shard(self, prompt_index: int) -> bool:
        return prompt_index % self.shard_count == self.shard_index

    def shard_rows(self, num_rows: int) -> int:
        """How many of an input's `num_rows` prompts are this job's."""
        return len(range(self.shard_index, num_rows, self.shard_count))

    def to_json(self) -> str:
        """The stored form (it holds the endpoints' API key: the store is the daemon user's alone)."""
        raw = asdict(self)
        raw["input_path"], raw["output_path"] = str(self.input_path), str(self.output_path)
        raw["policy"], raw["on_error"] = str(self.policy), str(self.on_error)
        return json.dumps(raw)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """A stored spec: this release's form, or the previous one's (`JobRequest.to_json()`, whose
        model was the sampling parameters' `model`)."""
        raw: dict[str, Any] = json.loads(text)
        sampling = dict(raw.pop("sampling"))
        if "model" in sampling:  # the previous release's form
            raw["model"] = sampling.pop("model")
        return cls(
            **{
                **raw,
                "input_path": Path(raw["input_path"]),
                "output_path": Path(raw["output_path"]),
                "sampling": Sampling(**{**sampling, "stop": tuple(sampling.get("stop", ()))}),
                "policy": Policy(raw.get("policy", Policy.LEAST_LOADED)),
                "endpoints": tuple(raw.get("endpoints", ())),
                "on_error": OnError(raw.get("on_error", OnError.RECORD)),
            }
        )


@dataclass
class JobRecord:
    """A job as the daemon keeps it: the spec (its model resolved), and what happened so far."""

    id: str
    spec: JobSpec
    state: JobState = JobState.QUEUED
    samples_total: int = 0  # prompts x num_samples; 0 until the input has been read
    samples_done: int = 0
    errors: int = 0  # samples written with an error
    completion_tokens: int = 0
    message: str = ""  # why it failed, was cancelled, or waits
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0  # 0: not yet
    finished_at: float = 0.0


@dataclass(frozen=True)
class Sample:
    """One finished (or failed) sample: a row of the output, before the input's columns are joined."""

    prompt_index: int
    sample_index: int
    response: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    endpoint: str | None
    latency_s: float | None
    seed: int | None
    error: str | None
    logprobs: list[float] | None = None
    token_ids: list[int] | None = None
    # The versions of the weights its tokens were made with, in order (weights/): one, or more when
    # an update in `keep` mode or a move between servers fell within it. None where the servers it
    # ran on have no version (launched without weight updates, or external).
    weight_versions: list[str] | None = None

    @property
    def weight_version(self) -> str | None:
        """The version that made its last token."""
        return self.weight_versions[-1] if self.weight_versions else None


def extra_body_from_json(text: str) -> Any:
    """The --extra-body JSON text as a value ({} when empty); `validate` checks that it is an object."""
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidSpec(f"--extra-body is not valid JSON: {exc}") from None


def validate(spec: JobSpec) -> JobSpec:
    """The spec, its enumerations as such, if it can run; else raise InvalidSpec saying what to change.

    Everything that can be said of a spec alone is checked here: what every server would refuse is
    refused once, before any request is sent. What needs the daemon's host (the files, the servers,
    the model) is checked by the daemon."""
    for path, what in ((spec.input_path, "input"), (spec.output_path, "output")):
        if not path.is_absolute():
            raise InvalidSpec(f"the {what} path must be absolute, got {str(path)!r} (mvllmctl resolves it)")
    if not 1 <= spec.num_samples < MAX_SAMPLES:
        raise InvalidSpec(f"--num-samples must be from 1 to {MAX_SAMPLES - 1}, got {spec.num_samples}")
    if not spec.wait_for_instances_s >= 0:  # NaN too
        raise InvalidSpec("--wait-for-instances must be 0 or more seconds")
    if spec.max_concurrent < 0:
        raise InvalidSpec(f"--max-concurrent must be 1 or more (0: the daemon's default), got {spec.max_concurrent}")
    _check_sampling(spec.sampling)
    if spec.endpoint_api_key and not spec.endpoints:
        raise InvalidSpec("--api-key is for --endpoints servers; mvllmd's instances use their own keys")
    if spec.weight_version and spec.endpoints:
        raise InvalidSpec("--weight-version is for mvllmd's instances: it knows no version of --endpoints servers")
    if not 1 <= spec.shard_count <= MAX_SHARDS or not 0 <= spec.shard_index < spec.shard_count:
        raise InvalidSpec(
            f"--shard K/N: N from 1 to {MAX_SHARDS} and K from 0 to N-1, got {spec.shard_index}/{spec.shard_count}"
        )
    return replace(
        spec,
        policy=_member(Policy, spec.policy, "--policy"),
        on_error=_member(OnError, spec.on_error, "--on-error"),
        endpoints=tuple(spec.endpoints),
    )


def _check_sampling(sampling: Sampling) -> None:
    if sampling.max_tokens is not None and sampling.max_tokens < 1:
        raise InvalidSpec(f"--max-tokens must be 1 or more, got {sampling.max_tokens}")
    if not 0 <= sampling.temperature <= MAX_TEMPERATURE:
        raise InvalidSpec(f"--temperature must be from 0 to {MAX_TEMPERATURE:g}, got {sampling.temperature:g}")
    if not 0 < sampling.top_p <= 1:
        raise InvalidSpec(f"--top-p must be above 0 and at most 1, got {sampling.top_p:g}")
    if sampling.logprobs is not None and not 0 <= sampling.logprobs <= MAX_LOGPROBS:
        raise InvalidSpec(f"--logprobs must be from 0 to {MAX_LOGPROBS}, got {sampling.logprobs}")
    if sampling.seed is not None and not 0 <= sampling.seed < SEED_LIMIT:
        raise InvalidSpec(f"--seed must be from 0 to 2**63-1, got {sampling.seed}")
    if any(not stop for stop in sampling.stop):
        raise InvalidSpec("--stop cannot be an empty string")
    extra: object = sampling.extra_body  # from JSON: any value until checked
    if not isinstance(extra, dict):
        raise InvalidSpec("--extra-body must be a JSON object, e.g. '{\"top_k\": 20}'")


def _member(kind: type[_E], value: str, flag: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        choices = " or ".join(m.value for m in kind)
        raise InvalidSpec(f"{flag} must be {choices}, got {value!r}") from None
