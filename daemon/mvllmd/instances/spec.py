"""An instance's spec: everything needed to start its engine, written as JSON in the state directory.

The unit (systemd's `mvllm-instance@NAME.service` or the process backend) runs
`python -m mvllmd.instances.launcher STATE_DIR NAME`; the launcher reads this file and execs the engine. So no
user-supplied text (model names, engine arguments, environment) is ever spliced into a unit file or a
shell line: it travels as JSON strings into an argv list.

This module uses the standard library only: the launcher imports it at every engine start.
"""

from __future__ import annotations

import enum
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mvllmd.errors import storage_error

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class EngineKind(enum.StrEnum):
    VLLM = "vllm"
    SIM = "sim"


class InstanceState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class InstanceSpec:
    name: str
    engine: EngineKind
    model: str
    served_model_name: str
    host: str
    port: int
    tensor_parallel_size: int
    devices: tuple[str, ...]  # "kind:index", e.g. "gpu:0", "sim-gpu:3"
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    max_num_seqs: int = 0
    hf_token_file: str = ""  # the launcher reads it into HF_TOKEN; the token itself is never stored here
    launched_at: float = 0.0
    # Weight updates (weights/): the engine runs with vLLM's development routes on, bound to loopback.
    # `weight_version` is the version mvllmd gave the weights it loads at its next start (`--model` in
    # argv: `weights_path`); both change with each update, so a restart brings them back.
    weight_updates: bool = False
    weight_version: str = ""
    # Launched by a tune sweep for one trial (tune/): only the trial sends it work, and a restarted
    # mvllmd removes it instead of re-adopting it.
    trial: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def weights_path(self) -> str:
        """What the engine loads when it starts: its `--model` (engines.engine_argv puts it before any
        engine argument)."""
        return self.argv[self.argv.index("--model") + 1]

    def with_weights(self, path: str, version: str) -> InstanceSpec:
        """The spec of this instance on other weights: its engine starts from `path` (its `--model`;
        the served model name stays), and they are `version`."""
        argv = list(self.argv)
        argv[argv.index("--model") + 1] = path
        return replace(self, argv=tuple(argv), weight_version=version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> InstanceSpec:
        raw: dict[str, Any] = json.loads(text)
        raw["engine"] = EngineKind(raw["engine"])
        raw["devices"] = tuple(raw["devices"])
        raw["argv"] = tuple(raw["argv"])
        return cls(**raw)


def spec_dir(state_dir: Path) -> Path:
    return state_dir / "instances"


def spec_path(state_dir: Path, name: str) -> Path:
    return spec_dir(state_dir) / f"{name}.json"


def log_path(state_dir: Path, name: str) -> Path:
    return spec_dir(state_dir) / f"{name}.log"


def write_spec(state_dir: Path, spec: InstanceSpec) -> Path:
    """Write atomically, 0600: a reader never sees half a spec. StorageError (or OutOfSpace) if it cannot."""
    path = spec_path(state_dir, spec.name)
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(spec.to_json())
        tmp.replace(path)
    except OSError as exc:
        raise storage_error(exc, "writing the instance's spec", path) from None
    return path


def read_specs(state_dir: Path) -> list[InstanceSpec]:
    specs = []
    for path in sorted(spec_dir(state_dir).glob("*.json")):
        try:
            specs.append(InstanceSpec.from_json(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            continue  # a damaged spec names no instance we can run; it is left for a person to see
    return specs
