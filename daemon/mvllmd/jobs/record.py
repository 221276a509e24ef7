"""What a job is, as the daemon keeps it: the request as submitted, its state, and its counts.

A JobRequest is everything the user asked for, in domain terms; it is stored as JSON and is enough to
run the job again after a restart. A JobRecord adds what happened: state, counts, times, message.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mvllmd.jobs.dispatch import DispatchSettings, Policy
from mvllmd.jobs.requests import Sampling
from mvllmd.jobs.runner import JobSpec, OnError


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
class JobRequest:
    input_path: Path
    output_path: Path
    sampling: Sampling  # its model is "" until the daemon resolves it
    num_samples: int = 1
    prompt_column: str = "prompt"
    policy: Policy = "least-loaded"
    max_concurrent: int = 0  # 0: the daemon's default
    endpoints: tuple[str, ...] = ()  # external servers; empty: this daemon's READY instances
    wait_for_instances_s: float = 0.0
    on_error: OnError = "record"
    resume: bool = False
    overwrite: bool = False
    endpoint_api_key: str = field(default="", repr=False)  # for the --endpoints servers; never shown
    hedge: bool = True  # least-loaded: copy slow requests in the tail

    def job_spec(self, settings: DispatchSettings) -> JobSpec:
        return JobSpec(
            input_path=self.input_path,
            output_path=self.output_path,
            sampling=self.sampling,
            num_samples=self.num_samples,
            prompt_column=self.prompt_column,
            on_error=self.on_error,
            resume=self.resume,
            overwrite=self.overwrite,
            dispatch=replace(
                settings,
                policy=self.policy,
                max_concurrent=self.max_concurrent or settings.max_concurrent,
                hedge=self.hedge,
            ),
        )

    def to_json(self) -> str:
        raw = asdict(self)
        raw["input_path"], raw["output_path"] = str(self.input_path), str(self.output_path)
        return json.dumps(raw)

    @classmethod
    def from_json(cls, text: str) -> JobRequest:
        raw: dict[str, Any] = json.loads(text)
        sampling = raw.pop("sampling")
        sampling["stop"] = tuple(sampling["stop"])
        return cls(
            **{
                **raw,
                "input_path": Path(raw["input_path"]),
                "output_path": Path(raw["output_path"]),
                "sampling": Sampling(**sampling),
                "endpoints": tuple(raw["endpoints"]),
            }
        )


@dataclass
class JobRecord:
    id: str
    request: JobRequest
    state: JobState = JobState.QUEUED
    samples_total: int = 0
    samples_done: int = 0
    errors: int = 0
    completion_tokens: int = 0
    message: str = ""
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
