"""Where instances go: names, devices and ports, as pure functions."""

from __future__ import annotations

import socket

import pytest

from mvllmd.errors import Conflict, InvalidRequest, ResourceExhausted
from mvllmd.instances.placement import Pool, assign, instance_names, parse_devices, pick_ports, slug
from mvllmd.inventory import Device, DeviceKind, GpuProcess


def gpus(n: int, busy: dict[int, int] | None = None) -> tuple[Device, ...]:
    busy = busy or {}
    return tuple(
        Device(
            DeviceKind.GPU, i, f"GPU-{i}", "H100", processes=(GpuProcess(busy[i], "python", 1),) if i in busy else ()
        )
        for i in range(n)
    )


def indexes(groups: list[tuple[Device, ...]]) -> list[list[int]]:
    return [[d.index for d in g] for g in groups]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2-5-7b-instruct"),
        ("/models/llama-3.1-8b/", "llama-3-1-8b"),
        ('bad\nname"; rm -rf / $HOME %d', "home-d"),  # the last path part only
        ('a\nb"c;d$e%f', "a-b-c-d-e-f"),
        ("///", "instance"),
    ],
)
def test_slug(model: str, expected: str) -> None:
    assert slug(model) == expected


def test_names_take_the_lowest_free_indexes() -> None:
    assert instance_names("m", 3, {"m-1"}) == ["m-0", "m-2", "m-3"]
    with pytest.raises(InvalidRequest, match="must match"):
        instance_names("Bad_Prefix", 1, set())


def test_parse_devices() -> None:
    assert parse_devices("4-7") == [4, 5, 6, 7]
    assert parse_devices("0,2, 5-6") == [0, 2, 5, 6]
    for bad in ("a-b", "3-1", "1,1", ""):
        with pytest.raises(InvalidRequest):
            parse_devices(bad)


def test_contiguous_groups_around_held_devices() -> None:
    pool = Pool(DeviceKind.GPU, gpus(8), held={"gpu:1": "other-0"})
    assert indexes(assign(pool, 3, 2, "", force=False)) == [[2, 3], [4, 5], [6, 7]]


def test_falls_back_to_scattered_devices() -> None:
    pool = Pool(DeviceKind.GPU, gpus(4), held={"gpu:1": "a-0", "gpu:2": "b-0"})
    assert indexes(assign(pool, 1, 2, "", force=False)) == [[0, 3]]


def test_not_enough_says_what_is_free() -> None:
    pool = Pool(DeviceKind.GPU, gpus(8, busy={7: 4242}), held={"gpu:0": "a-0", "gpu:1": "a-0"})
    with pytest.raises(ResourceExhausted) as excinfo:
        assign(pool, 4, 2, "", force=False)
    message = str(excinfo.value)
    assert message.startswith("4 x TP2 needs 8 gpus; 5 free:")
    assert "free 2-6" in message and "held 0 by a-0, 1 by a-0" in message and "7 (pid 4242)" in message


def test_busy_gpu_refused_unless_forced() -> None:
    pool = Pool(DeviceKind.GPU, gpus(2, busy={0: 99}), held={})
    with pytest.raises(Conflict, match="in use by process 99"):
        assign(pool, 1, 1, "0", force=False)
    assert indexes(assign(pool, 1, 1, "0", force=True)) == [[0]]
    assert indexes(assign(pool, 1, 1, "", force=False)) == [[1]]


def test_explicit_devices() -> None:
    pool = Pool(DeviceKind.GPU, gpus(8), held={"gpu:5": "busy-0"})
    assert indexes(assign(pool, 2, 2, "0-3", force=False)) == [[0, 1], [2, 3]]
    with pytest.raises(Conflict, match="gpu 5 is held by instance busy-0"):
        assign(pool, 1, 4, "4-7", force=False)
    with pytest.raises(InvalidRequest, match="needs 4"):
        assign(pool, 2, 2, "0-2", force=False)
    with pytest.raises(InvalidRequest, match="there is no gpu 9"):
        assign(pool, 1, 1, "9", force=False)


def test_ports_skip_taken_and_bound() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        bound = s.getsockname()[1]
        ports = pick_ports("127.0.0.1", bound, 2, taken={bound + 1})
    assert ports[0] > bound + 1 and ports[1] > ports[0]
