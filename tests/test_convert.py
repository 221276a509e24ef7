"""The job model to and from the API's messages (mvllm.convert)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvllm.convert import spec_from_proto, spec_to_proto, state_from_proto, state_to_proto
from mvllm.jobs import InvalidSpec, JobSpec, JobState, OnError, Policy, Sampling
from mvllm.v1 import job_pb2 as pb

FULL = JobSpec(
    input_path=Path("/data/in.parquet"),
    output_path=Path("/data/out.parquet"),
    prompt_column="messages",
    num_samples=3,
    model="m",
    sampling=Sampling(
        max_tokens=9,
        temperature=0.5,
        top_p=0.9,
        stop=("a", "b"),
        seed=1,
        logprobs=2,
        return_token_ids=True,
        extra_body={"top_k": 5},
    ),
    policy=Policy.ROUND_ROBIN,
    max_concurrent=7,
    endpoints=("http://e:8000",),
    wait_for_instances_s=2.5,
    on_error=OnError.FAIL,
    resume=True,
    overwrite=False,
    endpoint_api_key="secret",
    hedge=False,
)


def test_a_spec_round_trips() -> None:
    assert spec_from_proto(spec_to_proto(FULL, with_api_key=True)) == FULL
    shown = spec_to_proto(FULL)  # a job shown back: never its key
    assert shown.endpoint_api_key == ""
    assert (shown.policy, shown.on_error, shown.no_hedge) == (pb.POLICY_ROUND_ROBIN, pb.ON_ERROR_FAIL, True)
    assert shown.sampling.extra_body_json == '{"top_k": 5}'


def test_unset_fields_take_the_models_defaults() -> None:
    got = spec_from_proto(pb.JobSpec(input_path="/i.parquet", output_path="/o.parquet"))
    assert got == JobSpec(Path("/i.parquet"), Path("/o.parquet"))
    assert spec_to_proto(got).sampling.HasField("max_tokens") is False  # None: the server's default
    assert spec_to_proto(got).sampling.HasField("seed") is False  # None: no seed sent


def test_what_cannot_be_read_is_an_invalid_spec() -> None:
    with pytest.raises(InvalidSpec, match="unknown policy 9"):
        spec_from_proto(pb.JobSpec(policy=9))  # type: ignore[arg-type]
    with pytest.raises(InvalidSpec, match="unknown on_error 9"):
        spec_from_proto(pb.JobSpec(on_error=9))  # type: ignore[arg-type]
    with pytest.raises(InvalidSpec, match="--extra-body is not valid JSON"):
        spec_from_proto(pb.JobSpec(sampling=pb.SamplingParams(extra_body_json="{")))


def test_states() -> None:
    for state in JobState:
        assert state_from_proto(state_to_proto(state)) is state
    assert state_from_proto(pb.JOB_STATE_UNSPECIFIED) is None
