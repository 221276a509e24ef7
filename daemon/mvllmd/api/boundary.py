"""The one place where domain errors become gRPC status codes: mvllmd's (errors.py), and a job spec
that fails `mvllm.jobs.validate` (InvalidSpec, a ValueError of the shared model).

Every servicer method is wrapped by `rpc`. It also sends the daemon's version as initial metadata
(`mvllm-version`), so a client can warn when its own version differs without an extra call.
Anything unexpected becomes INTERNAL with a message that leaks nothing; the traceback goes to the log.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from mvllm import VERSION_METADATA_KEY, __version__
from mvllm.jobs import InvalidSpec
from mvllmd import errors

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[Exception], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidSpec: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.AddressError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unreachable: grpc.StatusCode.UNAVAILABLE,  # mvllmctl tells it from an unreachable daemon
    errors.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyRunning: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.OutOfSpace: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.InventoryError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UnitError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StorageError: grpc.StatusCode.FAILED_PRECONDITION,
}

Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")
Method = Callable[[Servicer, Request, Any], Awaitable[Response]]


def status_for(exc: Exception) -> grpc.StatusCode | None:
    """A domain error's status (UNKNOWN for an MvllmError the table lacks); None for anything else."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.UNKNOWN if isinstance(exc, errors.MvllmError) else None


def _translate(exc: Exception, where: str) -> tuple[grpc.StatusCode, str]:
    """A domain error's status and message; anything else is INTERNAL, saying nothing of itself."""
    status = status_for(exc)
    if status is not None:
        return status, str(exc)
    log.error("internal error in %s", where, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error in mvllmd; its log has the details"


def rpc(method: Method[Servicer, Request, Response]) -> Method[Servicer, Request, Response]:
    """Wrap a unary servicer method: version metadata, error mapping, no leaked internals."""

    @functools.wraps(method)
    async def wrapper(self: Servicer, request: Request, context: Any) -> Response:
        await context.send_initial_metadata(((VERSION_METADATA_KEY, __version__),))
        try:
            return await method(self, request, context)
        except Exception as exc:
            await context.abort(*_translate(exc, method.__qualname__))
        raise AssertionError("context.abort returned")  # abort always raises

    return wrapper


StreamMethod = Callable[[Servicer, Request, Any], AsyncIterator[Response]]


def rpc_stream(method: StreamMethod[Servicer, Request, Response]) -> StreamMethod[Servicer, Request, Response]:
    """Wrap a server-streaming servicer method (an async generator) the same way as `rpc`."""

    @functools.wraps(method)
    async def wrapper(self: Servicer, request: Request, context: Any) -> AsyncIterator[Response]:
        await context.send_initial_metadata(((VERSION_METADATA_KEY, __version__),))
        items = method(self, request, context)
        try:
            async for item in items:
                yield item
        except Exception as exc:
            await context.abort(*_translate(exc, method.__qualname__))
        finally:
            close = getattr(items, "aclose", None)  # the method's generator: its cleanup runs now, not when collected
            if close is not None:
                await close()

    return wrapper
