"""Binding the daemon's listen addresses, safely.

- A unix socket is created 0660 (the process umask is 0077; the socket is then opened to its group),
  owned by `socket_group` when one is set. Never world-writable.
- Each unix socket has a lock file beside it (`mvllmd.sock.lock`): gRPC replaces a socket file that
  exists, so without the lock a second daemon would silently steal the first one's socket.
- An explicit socket path's directory must exist; only the default socket's directory is created.
- A TCP listener speaks TLS when the daemon has a certificate (tls.py), mutual TLS with a client CA.
- A TCP port is checked before gRPC binds it, for a clear "in use" message. gRPC's SO_REUSEPORT is
  off (see server.py), so two daemons can never share a port.
- If any address fails, every address bound so far is released before the error is raised: nothing is
  left half-bound.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

from mvllmd.addresses import ListenAddress, TcpAddress, UnixAddress
from mvllmd.errors import AddressError, MvllmError
from mvllmd.locks import PidLock
from mvllmd.tls import TlsFiles

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660


class Listeners:
    def __init__(self, addresses: tuple[ListenAddress, ...], socket_group: str, tls: TlsFiles | None = None) -> None:
        self._addresses = addresses
        self._tls = tls
        self._gid = grp.getgrnam(socket_group).gr_gid if socket_group else -1
        self._locks: list[PidLock] = []
        self._sockets: list[Path] = []
        self.bound: tuple[str, ...] = ()

    def bind(self, server: Any) -> tuple[str, ...]:
        """Bind every address to the grpc.aio `server` (not yet started); return them as bound."""
        bound = []
        try:
            for address in self._addresses:
                bound.append(self._bind_one(server, address))
        except MvllmError:
            self.close()
            raise
        self.bound = tuple(bound)
        return self.bound

    def close(self) -> None:
        """Remove our socket files (gRPC does too, once it has started), then release their locks."""
        for path in self._sockets:
            _unlink_socket(path)
        self._sockets.clear()
        for lock in self._locks:
            lock.release()
        self._locks.clear()

    def _bind_one(self, server: Any, address: ListenAddress) -> str:
        if isinstance(address, UnixAddress):
            return self._bind_unix(server, address)
        credentials = self._tls.server_credentials() if self._tls is not None else None
        return _bind_tcp(server, address, credentials)

    def _bind_unix(self, server: Any, address: UnixAddress) -> str:
        path = address.path
        self._prepare_directory(address)
        lock = PidLock(path.with_name(path.name + ".lock"), f"socket {address}")
        lock.acquire()
        self._locks.append(lock)
        if path.exists() and not stat.S_ISSOCK(path.lstat().st_mode):
            raise AddressError(f"cannot listen on {address}: {path} exists and is not a socket")
        _add_port(server, address)
        self._sockets.append(path)
        os.chmod(path, SOCKET_MODE)
        if self._gid >= 0:
            os.chown(path, -1, self._gid)
        return str(address)

    def _prepare_directory(self, address: UnixAddress) -> None:
        parent = address.path.parent
        if parent.is_dir():
            return
        if not address.default:
            raise AddressError(
                f"cannot listen on {address}: directory {parent} does not exist; create it first "
                "(mvllmd creates no directories for an explicit --listen), or use the default socket"
            )
        # Only the default socket's own directory; its parent (XDG_RUNTIME_DIR, /run) must exist.
        try:
            parent.mkdir(mode=0o750 if self._gid >= 0 else 0o700)
        except OSError as exc:
            raise AddressError(f"cannot create {parent} for the default socket: {exc.strerror}") from exc
        if self._gid >= 0:
            os.chown(parent, -1, self._gid)


def _bind_tcp(server: Any, address: TcpAddress, credentials: Any) -> str:
    _check_port_free(address)
    port = _add_port(server, address, credentials)
    return str(TcpAddress(address.host, port))


def _check_port_free(address: TcpAddress) -> None:
    if address.port == 0:
        return
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
        try:
            probe.bind((address.host, address.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressError(f"cannot listen on {address}: the port is in use (another mvllmd?)") from exc
            raise AddressError(f"cannot listen on {address}: {exc.strerror}") from exc


def _add_port(server: Any, address: ListenAddress, credentials: Any = None) -> int:
    try:
        if credentials is not None:
            port = int(server.add_secure_port(str(address), credentials))
        else:
            port = int(server.add_insecure_port(str(address)))
    except RuntimeError as exc:
        raise AddressError(f"cannot listen on {address}: gRPC could not bind it") from exc
    if port == 0:
        raise AddressError(f"cannot listen on {address}: gRPC could not bind it")
    return port


def _unlink_socket(path: Path) -> None:
    """Remove our socket file; only ever a socket, never a file someone put there since."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
