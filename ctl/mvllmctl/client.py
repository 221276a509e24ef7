"""Reaching mvllmd: where it listens, one call at a time, errors as one line and an exit status."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from mvllm import VERSION_METADATA_KEY, __version__
from mvllmctl.exit_codes import ExitStatus, for_status_code
from mvllmd.addresses import ROOT_SOCKET, user_socket

Response = TypeVar("Response")


class CtlError(Exception):
    """A failure to report as one line on stderr, with the exit status to leave with."""

    def __init__(self, message: str, status: ExitStatus) -> None:
        super().__init__(message)
        self.status = status


def resolve_address(explicit: str | None, environ: Mapping[str, str]) -> str:
    """--address, else $MVLLM_ADDRESS, else the first default socket that exists (else the first)."""
    given = explicit or environ.get("MVLLM_ADDRESS", "")
    if given:
        return f"unix:{given}" if given.startswith("/") else given
    candidates = [ROOT_SOCKET]
    if environ.get("XDG_RUNTIME_DIR"):
        candidates.insert(0, user_socket(environ["XDG_RUNTIME_DIR"]))
    found = next((c for c in candidates if c.exists()), candidates[0])
    return f"unix:{found}"


@dataclass
class Client:
    address: str
    timeout_s: float
    _channel: Any = None

    def channel(self) -> Any:
        if self._channel is None:
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
        """A server stream, without a deadline (it may follow a log for hours)."""
        try:
            yield from method(request)
        except grpc.RpcError as exc:
            raise self._explain(exc) from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def _explain(self, exc: Any) -> CtlError:
        code, details = exc.code(), exc.details() or ""
        if code is grpc.StatusCode.UNAVAILABLE and "Permission denied" in details:
            return CtlError(
                f"cannot connect to mvllmd at {self.address}: permission denied "
                "(the socket is 0660: run as its owner, or join its group)",
                ExitStatus.UNREACHABLE,
            )
        if code is grpc.StatusCode.UNAVAILABLE:
            return CtlError(
                f"mvllmd is not running at {self.address}; start it with 'mvllmd' (or "
                "'systemctl start mvllmd'), or point --address / MVLLM_ADDRESS at it",
                ExitStatus.UNREACHABLE,
            )
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return CtlError(f"mvllmd at {self.address} did not answer within {self.timeout_s:g}s", ExitStatus.FAILED)
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return CtlError(
                f"mvllmd at {self.address} does not know this call; is it older than mvllmctl {__version__}?",
                ExitStatus.FAILED,
            )
        return CtlError(details or code.name.lower(), for_status_code(code))


def _warn_on_version_skew(metadata: Mapping[str, str]) -> None:
    theirs = metadata.get(VERSION_METADATA_KEY)
    if theirs and theirs != __version__:
        print(
            f"warning: mvllmctl {__version__} is talking to mvllmd {theirs}; upgrade the older one",
            file=sys.stderr,
        )
