"""The daemon's exception tree. Domain code raises these; the gRPC boundary maps them to status codes.

    MvllmError
    ├── ConfigError              invalid configuration or flags            (exit 2 at start-up)
    ├── AddressError             a listen address that cannot be used       (exit 2 at start-up)
    ├── AlreadyRunning           another mvllmd holds the socket or state   (exit 1 at start-up)
    ├── InventoryError           a device source that was asked for fails   (exit 1 at start-up)
    ├── InvalidRequest           a request that can never succeed           → INVALID_ARGUMENT
    ├── NotFound                 a named thing does not exist               → NOT_FOUND
    ├── Forbidden                the caller may not do this (a user's        → PERMISSION_DENIED
    │                            certificate calling a daemons-only RPC)
    ├── Unreachable              a server the daemon was asked to reach     → UNAVAILABLE
    │                            does not answer (mvllmctl attach)
    ├── Conflict                 the thing exists, or is in the wrong state → FAILED_PRECONDITION
    ├── ResourceExhausted        no devices, ports or slots left            → RESOURCE_EXHAUSTED
    │   └── OutOfSpace           a file system (output, state) is full      → RESOURCE_EXHAUSTED
    ├── StorageError             a file or the state database failed        → FAILED_PRECONDITION
    └── UnitError                the unit manager refused an operation      → FAILED_PRECONDITION

A job spec that fails the shared model's checks raises `mvllm.jobs.InvalidSpec` (a ValueError, outside
this tree: mvllmctl raises it too), which the boundary also maps to INVALID_ARGUMENT.

Messages are written for the person who reads them: what was wrong, and what to do instead. An
OSError on a path the user can fix (a full disk, a removed folder, a read-only mount) becomes one of
these through `storage_error`, naming the path and the cause: "internal error" is left for bugs.
This module imports nothing of mvllmd, so every other module (the inventory too) can use it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)


class MvllmError(Exception):
    """Base of every error mvllmd raises on purpose."""


class ConfigError(MvllmError):
    """The configuration file or a flag is invalid."""


class AddressError(MvllmError):
    """A listen address is malformed, refused by policy, or cannot be bound."""


class AlreadyRunning(MvllmError):
    """Another mvllmd already serves this socket or owns this state directory."""


class InventoryError(MvllmError):
    """A device source that the configuration asked for by name could not be read."""


class InvalidRequest(MvllmError):
    """A request that can never succeed as written."""


class NotFound(MvllmError):
    """A named object does not exist."""


class Forbidden(MvllmError):
    """The caller may not do this, whatever it asks: a daemons-only RPC called without a host certificate."""


class Unreachable(MvllmError):
    """A server that the daemon was asked to reach (an external server at attach) does not answer."""


class Conflict(MvllmError):
    """The object exists already, or is in a state that forbids the operation."""


class ResourceExhausted(MvllmError):
    """Not enough devices, ports or slots are free for the request."""


class OutOfSpace(ResourceExhausted):
    """A file system the daemon writes (an output's, the state directory's) is full."""


class StorageError(MvllmError):
    """A file or the state database could not be written or read, for a reason the user can fix."""


def cause(exc: OSError) -> str:
    """An OS error's cause in words ("no space left on device"), whoever raised it: pyarrow's OSErrors
    carry the errno with a message of their own."""
    return (os.strerror(exc.errno) if exc.errno else str(exc)).lower()


def storage_error(exc: OSError, doing: str, path: Path | str, then: str = "") -> StorageError | OutOfSpace:
    """`exc` as the error a user reads: "no space left on device writing PATH; THEN"."""
    message = f"{cause(exc)} {doing} {path}" + (f"; {then}" if then else "")
    return OutOfSpace(message) if exc.errno in FULL else StorageError(message)


class UnitError(MvllmError):
    """The unit manager (systemd, or the built-in supervisor) refused or failed an operation."""
