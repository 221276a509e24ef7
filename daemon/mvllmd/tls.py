"""TLS for mvllmd's TCP listeners: the PEM files, checked at start-up, gRPC's server credentials and the
HTTP front door's context.

With a certificate and key, every TCP listener speaks TLS (unix sockets stay plain: their file mode
guards them). With a client CA too, a client must present a certificate that CA signed (mutual TLS):
that, not encryption alone, is what keeps a daemon reachable off loopback from being controlled by
anyone who reaches its port, so off loopback mvllmd asks for it (addresses.check_tcp_policy).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mvllmd.errors import ConfigError


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # the server's certificate chain (PEM)
    key: Path  # its private key (PEM)
    client_ca: Path | None = None  # CA bundle (PEM) that client certificates must chain to

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def server_credentials(self) -> Any:
        try:
            root = self.client_ca.read_bytes() if self.client_ca else None
            pair = (self.key.read_bytes(), self.cert.read_bytes())
        except OSError as exc:  # checked at start-up, but a file can go before the listeners bind
            raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
        return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)

    def http_context(self) -> ssl.SSLContext:
        """The HTTP front door's server context: this certificate; clients prove themselves by token."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load {self.cert} and {self.key}: {exc}") from None
        return context


def tls_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> TlsFiles | None:
    """The TLS settings from the config's three (absolute) paths, checked; None without TLS."""
    if not (cert or key or client_ca):
        return None
    if not cert or not key:
        raise ConfigError("TLS needs both tls_cert (--tls-cert) and tls_key (--tls-key)")
    for path, name in ((cert, "tls_cert"), (key, "tls_key"), (client_ca, "tls_client_ca")):
        if path is not None:
            _check_readable(path, name)
    files = TlsFiles(cert, key, client_ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls_cert {files.cert} and tls_key {files.key} are not a PEM certificate and its private key "
            f"({exc.reason or exc})"
        ) from None
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"tls_client_ca {files.client_ca} holds no PEM certificate ({exc.reason or exc})"
            ) from None
    return files


def _check_readable(path: Path, key: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"[daemon] {key}: cannot read {path}: {exc.strerror}") from None
