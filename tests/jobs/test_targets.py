"""Servers named by URL: the seed's list, with or without /v1, and the model they serve."""

from __future__ import annotations

import pytest

from mvllmd.errors import InvalidRequest
from mvllmd.jobs.targets import endpoint_model, normalize_url

from simkit import StartSim


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("http://localhost:8000/v1", "http://localhost:8000"),
        ("http://localhost:8000/v1/", "http://localhost:8000"),
        ("  http://10.0.0.5:8001  ", "http://10.0.0.5:8001"),
        ("https://gpu-box.internal", "https://gpu-box.internal"),
        ("http://[::1]:8000/v1", "http://[::1]:8000"),
    ],
)
def test_urls_with_or_without_v1(given: str, url: str) -> None:
    assert normalize_url(given) == url


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("localhost:8000", "give a URL like"),
        ("ftp://host:21", "give a URL like"),
        ("http://host:99999", "port"),
        ("http://host:8000/api/v1", "only scheme, host and port"),
    ],
)
def test_bad_urls_say_what_is_expected(given: str, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        normalize_url(given)


async def test_the_model_is_asked_of_the_servers(start_sim: StartSim) -> None:
    one, _ = await start_sim("--time-scale", "0", "--served-model-name", "qwen")
    two, _ = await start_sim("--time-scale", "0", "--served-model-name", "qwen")
    other, _ = await start_sim("--time-scale", "0", "--served-model-name", "llama")
    dead = "http://127.0.0.1:9"  # nothing listens: not held against the job
    assert await endpoint_model([one, two, dead], "") == "qwen"
    assert await endpoint_model([one, dead], "qwen") == "qwen"
    with pytest.raises(InvalidRequest, match="do not serve model 'llama'; they serve: qwen"):
        await endpoint_model([one, two], "llama")
    with pytest.raises(InvalidRequest, match="serve llama, qwen; pass --model"):
        await endpoint_model([one, other], "")
    with pytest.raises(InvalidRequest, match="answered /v1/models; pass --model"):
        await endpoint_model([dead], "")
