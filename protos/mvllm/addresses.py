"""Where mvllmd listens by default, for the daemon (which binds there) and its clients (which look there).

A user's mvllmd listens on $XDG_RUNTIME_DIR/mvllmd/mvllmd.sock, the system's (root, or systemd's
RuntimeDirectory=mvllmd) on /run/mvllmd/mvllmd.sock. Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

SOCKET_NAME = "mvllmd.sock"
ROOT_SOCKET = Path("/run/mvllmd") / SOCKET_NAME


def user_socket(xdg_runtime_dir: str) -> Path:
    """The default socket of a user's mvllmd: $XDG_RUNTIME_DIR/mvllmd/mvllmd.sock."""
    return Path(xdg_runtime_dir) / "mvllmd" / SOCKET_NAME


def client_sockets(environ: Mapping[str, str]) -> list[Path]:
    """Where a client looks for mvllmd with no address given, in order: the user's, then the system's."""
    candidates = [ROOT_SOCKET]
    if environ.get("XDG_RUNTIME_DIR"):
        candidates.insert(0, user_socket(environ["XDG_RUNTIME_DIR"]))
    return candidates
