"""The job model (mvllm.jobs): validate's checks, one by one, and the stored JSON, old and new."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mvllm.jobs import (
    MAX_LOGPROBS,
    MAX_SAMPLES,
    InvalidSpec,
    JobSpec,
    JobState,
    OnError,
    Policy,
    Sampling,
    extra_body_from_json,
    validate,
)

IN, OUT = Path("/data/in.parquet"), Path("/data/out.parquet")


def spec(**kw: object) -> JobSpec:
    """A spec of these fields; `sampling` as a dict of Sampling's."""
    sampling = kw.pop("sampling", {})
    assert isinstance(sampling, dict)
    fields: dict[str, object] = {"input_path": IN, "output_path": OUT, **kw}
    return JobSpec(sampling=Sampling(**sampling), **fields)  # type: ignore[arg-type]


def test_a_valid_spec_comes_back_with_its_enumerations() -> None:
    asked = spec(policy="round-robin", on_error="fail", endpoints=["http://e:8000"], endpoint_api_key="k")
    valid = validate(asked)
    assert valid.policy is Policy.ROUND_ROBIN and valid.on_error is OnError.FAIL
    assert valid.endpoints == ("http://e:8000",)
    assert validate(spec()) == spec()  # the defaults are valid as they are


REFUSED = [
    # (what is wrong, the spec's fields, the message users see: it names the flag)
    ("relative input", {"input_path": Path("in.parquet")}, "the input path must be absolute, got 'in.parquet'"),
    ("relative output", {"output_path": Path("o.parquet")}, "the output path must be absolute, got 'o.parquet'"),
    ("no samples", {"num_samples": 0}, "--num-samples must be from 1 to 65535, got 0"),
    ("too many samples", {"num_samples": MAX_SAMPLES}, "--num-samples must be from 1 to 65535, got 65536"),
    ("negative wait", {"wait_for_instances_s": -1.0}, "--wait-for-instances must be 0 or more seconds"),
    ("negative concurrency", {"max_concurrent": -1}, "--max-concurrent must be 1 or more (0: the daemon's default)"),
    ("no tokens", {"sampling": {"max_tokens": 0}}, "--max-tokens must be 1 or more, got 0"),
    ("cold", {"sampling": {"temperature": -0.5}}, "--temperature must be from 0 to 100, got -0.5"),
    ("hot", {"sampling": {"temperature": 101.0}}, "--temperature must be from 0 to 100, got 101"),
    ("top-p 0", {"sampling": {"top_p": 0.0}}, "--top-p must be above 0 and at most 1, got 0"),
    ("top-p above 1", {"sampling": {"top_p": 1.5}}, "--top-p must be above 0 and at most 1, got 1.5"),
    ("logprobs", {"sampling": {"logprobs": MAX_LOGPROBS + 1}}, "--logprobs must be from 0 to 20, got 21"),
    ("negative seed", {"sampling": {"seed": -1}}, "--seed must be from 0 to 2**63-1, got -1"),
    ("huge seed", {"sampling": {"seed": 2**63}}, f"--seed must be from 0 to 2**63-1, got {2**63}"),
    ("empty stop", {"sampling": {"stop": ("\n", "")}}, "--stop cannot be an empty string"),
    ("extra body list", {"sampling": {"extra_body": [1]}}, "--extra-body must be a JSON object, e.g. '{"),
    ("key for instances", {"endpoint_api_key": "k"}, "--api-key is for --endpoints servers; mvllmd's instances use"),
    ("unknown policy", {"policy": "fastest"}, "--policy must be least-loaded or round-robin, got 'fastest'"),
    ("unknown on-error", {"on_error": "ignore"}, "--on-error must be record or fail, got 'ignore'"),
]


@pytest.mark.parametrize(("case", "fields", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_validate_refuses(case: str, fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSpec) as refused:
        validate(spec(**fields))
    assert str(refused.value).startswith(message)
    assert isinstance(refused.value, ValueError)


def test_the_edges_are_valid() -> None:
    validate(spec(num_samples=MAX_SAMPLES - 1, wait_for_instances_s=0.0))
    validate(spec(sampling={"max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "logprobs": 0, "seed": 0}))
    validate(spec(sampling={"temperature": 100.0, "logprobs": MAX_LOGPROBS, "seed": 2**63 - 1}))


def test_extra_body_from_json() -> None:
    assert extra_body_from_json("") == {}
    assert extra_body_from_json('{"top_k": 20}') == {"top_k": 20}
    assert extra_body_from_json("[1]") == [1]  # JSON, but not an object: validate() says so
    with pytest.raises(InvalidSpec, match=r"^--extra-body is not valid JSON: Expecting property name"):
        extra_body_from_json("{top_k: 20")


def test_the_stored_json_round_trips() -> None:
    full = spec(model="m", num_samples=3, sampling={"max_tokens": 9, "stop": ("a",), "seed": 1, "logprobs": 2,
                "return_token_ids": True, "extra_body": {"top_k": 5}}, policy=Policy.ROUND_ROBIN, max_concurrent=7,
                endpoints=("http://e",), wait_for_instances_s=2.5, on_error=OnError.FAIL, resume=True,
                endpoint_api_key="k", hedge=False)  # fmt: skip
    text = full.to_json()
    assert JobSpec.from_json(text) == full
    raw = json.loads(text)
    assert raw["model"] == "m" and "model" not in raw["sampling"]
    assert (raw["policy"], raw["on_error"]) == ("round-robin", "fail")  # the strings, as before


def test_the_previous_releases_stored_json_loads() -> None:
    # JobRequest.to_json() of the previous release: the model was the sampling parameters' own.
    previous = (
        '{"input_path": "/data/in.parquet", "output_path": "/data/out.parquet", "sampling": {"model": "m", '
        '"max_tokens": 7, "temperature": 1.0, "top_p": 1.0, "stop": ["\\n\\n"], "seed": 3, "logprobs": null, '
        '"return_token_ids": false, "extra_body": {"top_k": 20}}, "num_samples": 4, "prompt_column": "prompt", '
        '"policy": "least-loaded", "max_concurrent": 0, "endpoints": [], "wait_for_instances_s": 0.0, '
        '"on_error": "record", "resume": false, "overwrite": false, "endpoint_api_key": "", "hedge": true}'
    )
    loaded = JobSpec.from_json(previous)
    sampling = Sampling(max_tokens=7, stop=("\n\n",), seed=3, extra_body={"top_k": 20})
    assert loaded == JobSpec(IN, OUT, num_samples=4, model="m", sampling=sampling)
    assert loaded.policy is Policy.LEAST_LOADED and loaded.on_error is OnError.RECORD
    assert JobSpec.from_json(loaded.to_json()) == loaded  # and it is written back in this release's form


def test_the_api_key_is_never_shown() -> None:
    assert "secret" not in repr(spec(endpoints=("http://e",), endpoint_api_key="secret"))


def test_ended_states() -> None:
    assert {s for s in JobState if s.ended} == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def test_the_model_imports_nothing_of_the_project() -> None:
    # The CLI and the daemon's store import it: it must not pull in the engine (or anything else).
    code = "import sys, mvllm.jobs; print(sorted(m for m in sys.modules if m.startswith('mvllm')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['mvllm', 'mvllm.jobs']"


def test_a_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec().model = "other"  # type: ignore[misc]
