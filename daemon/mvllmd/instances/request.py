"""A launch request, as the API hands it to the instance manager, and the one place it is checked."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from mvllmd.errors import InvalidRequest
from mvllmd.instances.spec import EngineKind

DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"  # vLLM's development and RL routes, with no authentication
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class LaunchRequest:
    model: str
    count: int = 1
    tensor_parallel_size: int = 1
    engine: EngineKind = EngineKind.VLLM
    devices: str = ""
    port_base: int | None = None
    host: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)
    engine_args: tuple[str, ...] = ()
    name_prefix: str = ""
    api_key: str = ""
    force: bool = False
    cpu: bool = False
    max_num_seqs: int = 0
    weight_updates: bool | None = None  # vLLM's development routes on (weights/), loopback only; None: config's
    trial: bool = False  # for a tune trial (tune/): the trial's alone, removed when mvllmd starts again


def validate(request: LaunchRequest) -> None:
    """Raise InvalidRequest, naming the flag, for what no engine could run with. What depends on this
    host (devices, ports, names, the engine's interpreter) is checked where it is decided."""
    if not request.model or "\0" in request.model:
        raise InvalidRequest("the model must be a non-empty string")
    if not 1 <= request.count <= 256:
        raise InvalidRequest(f"--instances must be from 1 to 256, got {request.count}")
    if not 1 <= request.tensor_parallel_size <= 64:
        raise InvalidRequest(f"--tp must be from 1 to 64, got {request.tensor_parallel_size}")
    _validate_env(request.env)
    if any("\0" in arg for arg in request.engine_args):
        raise InvalidRequest("engine arguments cannot hold a NUL byte")
    _validate_host(request.host)
    dev_mode = request.weight_updates or request.env.get(DEV_MODE_ENV, "0") not in {"", "0"}
    if dev_mode and not _loopback(request.host):
        raise InvalidRequest(
            f"--weight-updates needs --host on loopback, not {request.host}: vLLM's weight-update routes "
            "(/pause, /collective_rpc, /sleep) answer anyone who reaches the port, without the API key"
        )


def check_model_path(model: str) -> None:
    """A model given as an absolute path must be there, on this host (a hub name is the engine's to fetch)."""
    if os.path.isabs(model) and not os.path.exists(model):
        raise InvalidRequest(f"the model path {model} does not exist on this host")


def _validate_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        if not ENV_NAME.fullmatch(key) or "\0" in value:
            raise InvalidRequest(f"--env {key!r}: names are [A-Za-z_][A-Za-z0-9_]* and values hold no NUL")


def _loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def _validate_host(host: str) -> None:
    if host == "localhost":
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise InvalidRequest(f"--host {host!r}: give an IP address of this host, e.g. 127.0.0.1") from None
