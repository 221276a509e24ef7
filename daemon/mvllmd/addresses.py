"""Listen addresses in gRPC target syntax, and where the daemon listens by default.

    unix:/abs/path        a unix socket (also accepted: unix:///abs/path)
    host:port             TCP; IPv6 literals in brackets: [::1]:7070

The HTTP front door listens on URLs instead: `http://HOST:PORT` or `https://HOST:PORT` (`HttpAddress`),
with the same rule in its own terms (plaintext and token-less listeners on loopback only, unless
`--insecure-http`: `check_http_policy`).

Plaintext TCP is allowed on loopback only; any other host needs mutual TLS (a server certificate and
a CA for client certificates), or an explicit `--insecure-tcp`. The default sockets' paths come
from mvllm.addresses, which clients share.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mvllm.addresses import ROOT_SOCKET, SOCKET_NAME, user_socket
from mvllmd.errors import AddressError
from mvllmd.tls import TlsFiles


@dataclass(frozen=True)
class UnixAddress:
    path: Path
    # True for the daemon's own default: its directory is created (0700) when missing. An explicit
    # path's directory must exist: mvllmd never creates arbitrary directories.
    default: bool = False

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: we cannot know what it resolves to, so it is not loopback
            return False


ListenAddress = UnixAddress | TcpAddress


def parse_address(text: str) -> ListenAddress:
    """Parse one address in gRPC target syntax; raise AddressError with what is expected."""
    if text.startswith("unix:"):
        return _parse_unix(text)
    return _parse_tcp(text)


def _parse_unix(text: str) -> UnixAddress:
    raw = text.removeprefix("unix:")
    if raw.startswith("//"):
        raw = raw.removeprefix("//")
    if not raw.startswith("/"):
        raise AddressError(f"{text!r}: a unix socket needs an absolute path, e.g. unix:/run/mvllmd/mvllmd.sock")
    if "\0" in raw:
        raise AddressError(f"{text!r}: a socket path cannot contain a NUL byte")
    path = Path(raw)
    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes with its terminating NUL
        raise AddressError(f"{text!r}: a unix socket path must be at most 107 bytes")
    return UnixAddress(path)


def _parse_tcp(text: str) -> TcpAddress:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{text!r}: expected unix:/abs/path or host:port, e.g. 127.0.0.1:7070")
    if host.startswith("["):
        if not host.endswith("]"):
            raise AddressError(f"{text!r}: an IPv6 address goes in brackets, e.g. [::1]:7070")
        host = host[1:-1]
    elif ":" in host:
        raise AddressError(f"{text!r}: an IPv6 address goes in brackets, e.g. [::1]:7070")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise AddressError(f"{text!r}: the port must be a number from 0 to 65535")
    return TcpAddress(host, int(port_text))


def check_tcp_policy(address: ListenAddress, insecure_tcp: bool, tls: TlsFiles | None = None) -> None:
    """Off loopback, a TCP listener needs mutual TLS, unless the operator said --insecure-tcp: with
    plaintext, or TLS without client certificates, anyone who reaches the port could control mvllmd."""
    if not isinstance(address, TcpAddress) or address.is_loopback or insecure_tcp:
        return
    if tls is None:
        raise AddressError(
            f"refusing to listen on {address}: it is not a loopback address, and anyone who reaches it could "
            "control this daemon. Give it mutual TLS (--tls-cert, --tls-key and --tls-client-ca), listen on "
            "127.0.0.1 and tunnel, or pass --insecure-tcp (insecure_tcp = true) if the network is trusted."
        )
    if not tls.mutual:
        raise AddressError(
            f"refusing to listen on {address} with TLS but no --tls-client-ca: the traffic is encrypted, but "
            "anyone who reaches the port could still control this daemon. Give the CA that signs your clients' "
            "certificates, or pass --insecure-tcp (insecure_tcp = true) if the network is trusted."
        )


def default_socket(environ: Mapping[str, str], euid: int) -> UnixAddress:
    """The first that applies: systemd's RuntimeDirectory, $XDG_RUNTIME_DIR/mvllmd, /run/mvllmd (root)."""
    runtime_directory = first_path(environ.get("RUNTIME_DIRECTORY", ""))
    if runtime_directory:
        return UnixAddress(Path(runtime_directory) / SOCKET_NAME)
    xdg = environ.get("XDG_RUNTIME_DIR", "")
    if xdg:
        return UnixAddress(user_socket(xdg), default=True)
    if euid == 0:
        return UnixAddress(ROOT_SOCKET, default=True)
    raise AddressError("no default socket: XDG_RUNTIME_DIR is not set; pass --listen unix:/path/to/mvllmd.sock")


def first_path(value: str) -> str:
    """systemd passes several directories colon-separated; ours is the first."""
    return value.split(":", 1)[0]


@dataclass(frozen=True)
class HttpAddress:
    """Where the HTTP front door listens: http:// or https://, a host and a port (0: any free one)."""

    tls: bool
    tcp: TcpAddress

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.tcp}"


def parse_http_address(text: str) -> HttpAddress:
    """`http://HOST:PORT` or `https://HOST:PORT`; raise AddressError with what is expected."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https") or "/" in rest:
        raise AddressError(
            f"{text!r}: expected http://HOST:PORT or https://HOST:PORT (or none), e.g. http://127.0.0.1:7080"
        )
    return HttpAddress(scheme == "https", _parse_tcp(rest))


def check_http_policy(address: HttpAddress, insecure_http: bool, tls: TlsFiles | None, tokens: bool) -> None:
    """https:// needs the daemon's certificate; off loopback, the front door needs TLS and tokens, unless
    --insecure-http: anyone who reaches it could otherwise use every server behind it. A daemon of a fleet
    (mutual TLS) may listen there without tokens: that listener serves only the per-instance routes,
    whose tokens it gives its peers (`fleet_only`)."""
    if address.tls and tls is None:
        raise AddressError(f"{address}: https needs the daemon's --tls-cert and --tls-key")
    if address.tcp.is_loopback or insecure_http:
        return
    if not address.tls:
        raise AddressError(
            f"refusing to listen on {address}: it is not a loopback address, and plain http would carry tokens and "
            "prompts in the clear. Use https:// (with --tls-cert and --tls-key), listen on 127.0.0.1, or pass "
            "--insecure-http (insecure_http = true) if the network is trusted."
        )
    if not tokens and not (tls is not None and tls.mutual):
        raise AddressError(
            f"refusing to listen on {address} without tokens: anyone who reaches it could use every server behind "
            "it. Give --http-token-file (one token per line), or pass --insecure-http if the network is trusted."
        )


def fleet_only(address: HttpAddress, insecure_http: bool, tokens: bool) -> bool:
    """Whether a listener serves the fleet's per-instance routes alone: off loopback, https, without the front
    door's tokens (allowed to a daemon with mutual TLS by check_http_policy), and not --insecure-http."""
    return not (address.tcp.is_loopback or insecure_http or tokens)
