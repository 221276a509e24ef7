"""A launch request is checked in one place, and every refusal names the flag."""

from __future__ import annotations

import pytest

from mvllmd.errors import InvalidRequest
from mvllmd.instances.request import LaunchRequest, validate


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (LaunchRequest(""), "the model must be a non-empty string"),
        (LaunchRequest("m\0"), "the model must be a non-empty string"),
        (LaunchRequest("m", count=0), "--instances must be from 1 to 256, got 0"),
        (LaunchRequest("m", count=257), "--instances must be from 1 to 256, got 257"),
        (LaunchRequest("m", tensor_parallel_size=65), "--tp must be from 1 to 64, got 65"),
        (LaunchRequest("m", env={"1A": "x"}), "--env '1A': names are"),
        (LaunchRequest("m", env={"A": "x\0"}), "--env 'A': names are"),
        (LaunchRequest("m", engine_args=("--x", "a\0")), "engine arguments cannot hold a NUL byte"),
        (LaunchRequest("m", host="example.com"), "--host 'example.com': give an IP address"),
        (LaunchRequest("m", host="0.0.0.0", weight_updates=True), "--weight-updates needs --host on loopback"),
        (LaunchRequest("m", host="10.1.2.3", env={"VLLM_SERVER_DEV_MODE": "1"}), "needs --host on loopback"),
    ],
)
def test_refused(request_: LaunchRequest, message: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        validate(request_)
    assert message in str(refused.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "0.0.0.0", "localhost"])
def test_accepted(host: str) -> None:
    validate(LaunchRequest("org/m", count=256, tensor_parallel_size=64, host=host, env={"_A1": ""}))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_weight_updates_on_loopback(host: str) -> None:
    validate(LaunchRequest("org/m", host=host, weight_updates=True))
