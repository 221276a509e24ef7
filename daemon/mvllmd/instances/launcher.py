"""`python -m mvllmd.instances.launcher STATE_DIR NAME`: start one engine as its spec says, by exec.

What a unit runs (systemd's mvllm-instance@.service, or the process backend). It sets the spec's
environment (CUDA_VISIBLE_DEVICES among it), reads HF_TOKEN from the token file if one is named, sends
stdout and stderr to the instance's log (rotating it when it is large), and replaces itself with the
engine, so the engine is the unit's main process. Standard library only: it runs at every start.

vLLM makes its processes' ZMQ sockets in VLLM_RPC_BASE_PATH (the temp directory by default) under new
names at every start and leaves them there when it is killed or stops: thousands in /tmp after a day of
restarts here. Each vLLM instance gets a directory of its own instead, emptied at each start of the
instance: STATE_DIR/ipc/NAME, or, where that path would leave a socket's path over the kernel's 107
bytes, a directory in the temp directory named by a digest of both. Made 0700; one that is not this
user's directory (a link, another user's) is not used, and vLLM keeps its default. An environment that
sets VLLM_RPC_BASE_PATH (`launch --env`) wins.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from mvllmd.instances.spec import EngineKind, InstanceSpec, spec_path

LOG_ROTATE_BYTES = 64 * 1024 * 1024
LOG_KEEP = 3
PROG = "mvllmd.instances.launcher"
IPC_ENV = "VLLM_RPC_BASE_PATH"
SOCKET_PATH_MAX = 107  # sun_path's 108 bytes, less the final NUL
ZMQ_NAME = 37  # "/" and a uuid4: the name vLLM gives each socket in the directory


class LaunchError(Exception):
    """Why the engine cannot be started, and the exit status that says so."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def rotate(log: Path) -> None:
    """log -> log.1 -> ... -> log.LOG_KEEP, when log is over LOG_ROTATE_BYTES."""
    try:
        if log.stat().st_size < LOG_ROTATE_BYTES:
            return
    except FileNotFoundError:
        return
    for i in range(LOG_KEEP - 1, 0, -1):
        older = log.with_name(f"{log.name}.{i}")
        if older.exists():
            older.replace(log.with_name(f"{log.name}.{i + 1}"))
    log.replace(log.with_name(f"{log.name}.1"))


def main(argv: list[str]) -> int:  # returns only when it cannot exec
    if len(argv) != 2:
        print(f"usage: python -m {PROG} STATE_DIR NAME", file=sys.stderr)
        return 2
    try:
        spec = read_spec(spec_path(Path(argv[0]), argv[1]))
        env = engine_environment(spec)
    except LaunchError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.status
    if spec.engine is EngineKind.VLLM and IPC_ENV not in env:
        ipc = ipc_dir(Path(argv[0]), argv[1])
        if ipc is not None:
            env[IPC_ENV] = str(ipc)
    if spec.log_path:
        redirect_output(Path(spec.log_path))
    try:
        os.execvpe(spec.argv[0], list(spec.argv), env)  # noqa: S606  (an argv list: no shell on purpose)
    except OSError as exc:
        print(f"{PROG}: cannot start {spec.argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127


def read_spec(path: Path) -> InstanceSpec:
    try:
        return InstanceSpec.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise LaunchError(f"cannot read spec {path}: {exc}", 1) from exc


def engine_environment(spec: InstanceSpec) -> dict[str, str]:
    """The launcher's environment, the spec's on top, and HF_TOKEN from the token file if one is named."""
    env = dict(os.environ)
    env.update(spec.env)
    if spec.hf_token_file:
        try:
            env["HF_TOKEN"] = Path(spec.hf_token_file).read_text().strip()
        except OSError as exc:
            raise LaunchError(f"cannot read the HF token file: {exc.strerror}", 1) from exc
    return env


def ipc_path(state_dir: Path, name: str) -> Path:
    """Where the instance's engine makes its ZMQ sockets (see the module's docstring)."""
    own = state_dir.resolve() / "ipc" / name
    if len(os.fsencode(own)) + ZMQ_NAME <= SOCKET_PATH_MAX:
        return own
    digest = hashlib.blake2b(os.fsencode(own), digest_size=8).hexdigest()
    return Path(tempfile.gettempdir()) / f"mvllm-ipc-{digest}"


def ipc_dir(state_dir: Path, name: str) -> Path | None:
    """The instance's socket directory, emptied and made 0700; None where it cannot be this user's own."""
    path = ipc_path(state_dir, name)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # the sockets of the engine's last start
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
    except OSError:
        pass  # judged below: it may still be ours
    try:
        info = path.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
        return None
    return path


def redirect_output(log: Path) -> None:
    """stdout and stderr to the instance's log (rotated first when it is large)."""
    rotate(log)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
