"""Reaching mvllmd: where it listens, one call at a time, errors as one line and an exit status."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from mvllm import VERSION_METADATA_KEY, __version__
from mvllm.addresses import client_sockets
from mvllmctl.exit_codes import ExitStatus, for_status_code

Response = TypeVar("Response")


class CtlError(Exception):
    """A failure to report as one line on stderr, with the exit status to leave with."""

    def __init__(self, message: str, status: ExitStatus) -> None:
        super().__init__(message)
        self.status = status


class StreamCut(CtlError):
    """A stream that had begun and lost its connection: mvllmd stopped or was killed mid-stream."""


def resolve_address(explicit: str | None, environ: Mapping[str, str]) -> str:
    """--address, else $MVLLM_ADDRESS, else the first default socket that exists (else the first)."""
    given = explicit or environ.get("MVLLM_ADDRESS", "")
    if given:
        return f"unix:{given}" if given.startswith("/") else given
    candidates = client_sockets(environ)
    found = next((c for c in candidates if c.exists()), candidates[0])
    return f"unix:{found}"


@dataclass(frozen=True)
class ClientTls:
    """TLS toward a daemon on TCP: the CA of its certificate, and ours for mutual TLS (PEM files)."""

    ca: Path | None = None  # None: the system's trusted roots
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> Any:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "--tls-ca"),
            private_key=_read(self.key, "--tls-key"),
            certificate_chain=_read(self.cert, "--tls-cert"),
        )


def resolve_tls(ca: str | None, cert: str | None, key: str | None, environ: Mapping[str, str]) -> ClientTls | None:
    """--tls-ca/--tls-cert/--tls-key, else $MVLLM_TLS_CA/_CERT/_KEY; None when none is given."""
    ca = ca or environ.get("MVLLM_TLS_CA") or None
    cert = cert or environ.get("MVLLM_TLS_CERT") or None
    key = key or environ.get("MVLLM_TLS_KEY") or None
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise CtlError("a client certificate needs both --tls-cert and --tls-key", ExitStatus.USAGE)
    return ClientTls(*(Path(p) if p else None for p in (ca, cert, key)))


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CtlError(f"{flag}: cannot read {path}: {exc.strerror}", ExitStatus.USAGE) from None


@dataclass
class Client:
    address: str
    timeout_s: float
    tls: ClientTls | None = None  # used for TCP addresses; a unix socket is always plain
    _channel: Any = None

    @property
    def secure(self) -> bool:
        return self.tls is not None and not self.address.startswith("unix:")

    def channel(self) -> Any:
        if self._channel is None:
            if self.secure:
                assert self.tls is not None
                self._channel = grpc.secure_channel(self.address, self.tls.credentials())
            else:
                self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def call(self, method: Any, request: Any, min_timeout_s: float = 0.0) -> Any:
        """Make one unary call; raise CtlError with a readable message when it fails."""
        try:
            response, call = method.with_call(request, timeout=max(self.timeout_s, min_timeout_s))
        except grpc.RpcError as exc:
            raise self._explain(exc) from None
        _warn_on_version_skew(dict(call.initial_metadata() or ()))
        return response

    def stream(self, method: Any, request: Any) -> Iterator[Any]:
        """A server stream, without a deadline (it may follow a log for hours). A connection lost after the
        first response raises StreamCut: the daemon went away mid-stream, it was reached."""
        began = False
        try:
            for response in method(request):
                began = True
                yield response
        except grpc.RpcError as exc:
            if began and exc.code() is grpc.StatusCode.UNAVAILABLE:
                reason = _last_error(exc.details() or "")
                message = f"mvllmd at {self.address} went away mid-stream ({reason})"
                raise StreamCut(message, ExitStatus.UNREACHABLE) from None
            raise self._explain(exc) from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def _unreachable(self, details: str) -> CtlError:
        if "Permission denied" in details:
            return CtlError(
                f"cannot connect to mvllmd at {self.address}: permission denied "
                "(the socket is 0660: run as its owner, or join its group)",
                ExitStatus.UNREACHABLE,
            )
        reason = _last_error(details)
        if any(w in details.lower() for w in ("ssl", "handshake", "tls", "verification")):
            return CtlError(
                f"the TLS handshake with mvllmd at {self.address} failed ({reason}): --tls-ca must hold the CA "
                "of the daemon's certificate, which must be in date, and its names must include the host dialled",
                ExitStatus.UNREACHABLE,
            )
        if self.secure:
            return CtlError(
                f"cannot reach mvllmd at {self.address} ({reason}); is it running, with TLS, and did the CA of "
                "its --tls-client-ca sign --tls-cert? is --tls-cert in date? (it closes the connection of a client "
                "it does not accept)",
                ExitStatus.UNREACHABLE,
            )
        if not self.address.startswith("unix:"):
            return CtlError(
                f"cannot reach mvllmd at {self.address} ({reason}); is it running, and if it listens with TLS, "
                "give --tls-ca, --tls-cert and --tls-key (or MVLLM_TLS_CA, _CERT, _KEY)",
                ExitStatus.UNREACHABLE,
            )
        return CtlError(
            f"mvllmd is not running at {self.address}; start it with 'mvllmd' (or "
            "'systemctl start mvllmd'), or point --address / MVLLM_ADDRESS at it",
            ExitStatus.UNREACHABLE,
        )

    def _explain(self, exc: Any) -> CtlError:
        code, details = exc.code(), exc.details() or ""
        if code is grpc.StatusCode.UNAVAILABLE and _from_daemon(exc):  # a server the daemon could not reach
            return CtlError(details, ExitStatus.UNREACHABLE)
        if code is grpc.StatusCode.UNAVAILABLE:
            return self._unreachable(details)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return CtlError(f"mvllmd at {self.address} did not answer within {self.timeout_s:g}s", ExitStatus.FAILED)
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return CtlError(
                f"mvllmd at {self.address} does not know this call; is it older than mvllmctl {__version__}?",
                ExitStatus.FAILED,
            )
        return CtlError(details or code.name.lower(), for_status_code(code))


def _from_daemon(exc: Any) -> bool:
    """Whether the daemon itself answered: it sends its version first, which a failed connection lacks."""
    try:
        return any(key == VERSION_METADATA_KEY for key, _ in exc.initial_metadata() or ())
    except (AttributeError, TypeError, ValueError):
        return False


def _last_error(details: str) -> str:
    """The reason at the end of gRPC's "failed to connect to all addresses; last error: CODE: peer: reason"."""
    text = details.split("last error: ", 1)[-1].removesuffix(": OK")
    if "OPENSSL_internal:" in text:
        return text.rsplit("OPENSSL_internal:", 1)[1]
    return text.rsplit(": ", 1)[-1].strip() or details


def _warn_on_version_skew(metadata: Mapping[str, str]) -> None:
    theirs = metadata.get(VERSION_METADATA_KEY)
    if theirs and theirs != __version__:
        print(
            f"warning: mvllmctl {__version__} is talking to mvllmd {theirs}; upgrade the older one",
            file=sys.stderr,
        )
