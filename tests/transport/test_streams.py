"""Streamed answers as they come, and samples continued from what they had made (streams.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mvllm.jobs import Sample, Sampling
from mvllmd.transport.streams import STREAM_INTERVAL, Prefix, Stream, movable


def event(chunk: Any) -> bytes:
    return f"data: {json.dumps(chunk)}\n\n".encode()


def test_movable_jobs() -> None:
    assert movable(Sampling(max_tokens=2048, extra_body={"top_k": 5}))
    assert not movable(Sampling(max_tokens=2048, seed=1))  # a rerun must ask for the same samples
    assert not movable(Sampling(max_tokens=2048, stop=("\n",)))  # it could straddle the cut
    assert not movable(Sampling())  # no max_tokens to split
    assert not movable(Sampling(max_tokens=STREAM_INTERVAL))  # too short to be worth it
    assert not movable(Sampling(max_tokens=2048, extra_body={"repetition_penalty": 1.1}))


def test_a_completions_stream_in_pieces() -> None:
    finished: list[int] = []
    stream = Stream(2, lambda: finished.append(1))
    first = {"choices": [{"index": 1, "text": "a", "prompt_token_ids": [7, 8], "token_ids": [1],
                          "logprobs": {"token_logprobs": [-0.5]}, "finish_reason": None}]}  # fmt: skip
    data = event(first) + event({"choices": [{"index": 0, "text": "b", "token_ids": [2], "finish_reason": "stop"}]})
    stream.feed(data[:10])
    assert not stream.started
    stream.feed(data[10:])
    assert stream.started and stream.prompt_token_ids == [7, 8] and stream.unfinished() == [1]
    assert finished == [1]
    stream.feed(event({"choices": [{"index": 1, "text": " c", "token_ids": [3], "finish_reason": "length"}]}))
    stream.feed(event({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}) + b"data: [DONE]\n\n")
    assert stream.done and finished == [1, 1] and stream.unfinished() == []
    sample = stream.sample(1, "http://e", Sampling(logprobs=1, return_token_ids=True), 4, 6, 0.5)
    assert (sample.response, sample.finish_reason, sample.prompt_tokens, sample.completion_tokens) == (
        "a c",
        "length",
        2,
        2,
    )
    assert (sample.prompt_index, sample.sample_index, sample.token_ids, sample.logprobs) == (4, 6, [1, 3], [-0.5])
    assert stream.sample(0, "http://e", Sampling(), 4, 5, 0.5).token_ids is None  # the job did not ask


def test_a_chat_stream_and_malformed_events() -> None:
    stream = Stream(1)
    delta = {"role": "assistant", "content": "hi"}
    stream.feed(event({"prompt_token_ids": [5], "choices": [{"index": 0, "delta": delta, "token_ids": [9]}]}))
    stream.feed(b": a comment\n\n")
    assert stream.prompt_token_ids == [5] and stream.choices[0].text == ["hi"]
    for bad in (b"data: {not json\n\n", event([1]), event({"choices": [{"index": 3}]})):
        with pytest.raises(ValueError):
            Stream(1).feed(bad)


def test_a_prefix_continues_a_sample() -> None:
    stream = Stream(1)
    stream.feed(event({"choices": [{"index": 0, "text": "one two", "prompt_token_ids": [7, 8], "token_ids": [1, 2],
                                    "logprobs": {"token_logprobs": [-1.0, -2.0]}}]}))  # fmt: skip
    first = stream.prefix(0, started=10.0, earlier=None)
    assert first is not None and first.prompt() == [7, 8, 1, 2]
    # It moves again after making " three" on the next server, which saw [7, 8, 1, 2] as its prompt.
    again = Stream(1)
    again.feed(event({"choices": [{"index": 0, "text": " three", "prompt_token_ids": [7, 8, 1, 2], "token_ids": [3],
                                   "logprobs": {"token_logprobs": [-3.0]}, "finish_reason": None}]}))  # fmt: skip
    second = again.prefix(0, started=10.0, earlier=first)
    assert second == Prefix((7, 8), (1, 2, 3), "one two three", (-1.0, -2.0, -3.0), 2, 10.0)
    assert Stream(1).prefix(0, 1.0, None) is None  # nothing made yet
    rest = Sample(0, 3, " four", "stop", 5, 1, "http://fast", 0.1, None, None, [-4.0], [4])
    joined = second.join(rest)
    assert (joined.response, joined.finish_reason, joined.prompt_tokens, joined.completion_tokens) == (
        "one two three four", "stop", 2, 4)  # fmt: skip
    assert (joined.token_ids, joined.logprobs, joined.endpoint) == (
        [1, 2, 3, 4],
        [-1.0, -2.0, -3.0, -4.0],
        "http://fast",
    )


def test_each_token_is_labelled_with_the_version_read_with_it() -> None:
    version = ["a"]
    stream = Stream(2, version=lambda: version[0])
    stream.feed(event({"choices": [{"index": 0, "text": "x", "prompt_token_ids": [7], "token_ids": [1]},
                                   {"index": 1, "text": "y", "token_ids": [2]}]}))  # fmt: skip
    version[0] = "b"  # an update came between the two chunks (the server paused, reloaded, resumed)
    stream.feed(event({"choices": [{"index": 0, "text": " z", "token_ids": [3], "finish_reason": "length"}]}))
    stream.feed(event({"choices": [{"index": 1, "text": "", "token_ids": [], "finish_reason": "stop"}]}))
    assert stream.sample(0, "http://e", Sampling(), 0, 0, 0.1).weight_versions == ["a", "b"]
    assert stream.sample(0, "http://e", Sampling(), 0, 0, 0.1).weight_version == "b"
    assert stream.sample(1, "http://e", Sampling(), 0, 1, 0.1).weight_versions == ["a"]  # its last chunk made nothing
    unlabelled = Stream(1)
    unlabelled.feed(event({"choices": [{"index": 0, "text": "x", "token_ids": [1], "finish_reason": "stop"}]}))
    assert unlabelled.sample(0, "http://e", Sampling(), 0, 0, 0.1).weight_versions is None


def test_a_moved_sample_keeps_the_versions_of_both_parts() -> None:
    stream = Stream(1, version=lambda: "a")
    stream.feed(event({"choices": [{"index": 0, "text": "one", "prompt_token_ids": [7], "token_ids": [1]}]}))
    prefix = stream.prefix(0, started=1.0, earlier=None)
    assert prefix is not None and prefix.versions == ("a",)
    on_b = Sample(0, 0, " two", "stop", 2, 1, "http://b", 0.1, None, None, weight_versions=["b"])
    on_a = Sample(0, 0, " two", "stop", 2, 1, "http://a2", 0.1, None, None, weight_versions=["a"])
    unversioned = Sample(0, 0, " two", "stop", 2, 1, "http://x", 0.1, None, None)
    assert prefix.join(on_b).weight_versions == ["a", "b"]
    assert prefix.join(on_a).weight_versions == ["a"]  # one version, listed once
    assert prefix.join(unversioned).weight_versions == ["a"]
