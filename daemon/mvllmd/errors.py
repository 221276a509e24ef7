"""The daemon's exception tree. Domain code raises these; the gRPC boundary maps them to status codes.

    MvllmError
    ├── ConfigError              invalid configuration or flags            (exit 2 at start-up)
    ├── AddressError             a listen address that cannot be used       (exit 2 at start-up)
    ├── AlreadyRunning           another mvllmd holds the socket or state   (exit 1 at start-up)
    ├── InventoryError           a device source that was asked for fails   (exit 1 at start-up)
    ├── InvalidRequest           a request that can never succeed           → INVALID_ARGUMENT
    ├── NotFound                 a named thing does not exist               → NOT_FOUND
    ├── Conflict                 the thing exists, or is in the wrong state → FAILED_PRECONDITION
    ├── ResourceExhausted        no devices, ports or slots left            → RESOURCE_EXHAUSTED
    └── UnitError                the unit manager refused an operation      → FAILED_PRECONDITION

A job spec that fails the shared model's checks raises `mvllm.jobs.InvalidSpec` (a ValueError, outside
this tree: mvllmctl raises it too), which the boundary also maps to INVALID_ARGUMENT.

Messages are written for the person who reads them: what was wrong, and what to do instead.
This module imports nothing, so every other module (the inventory too) can use it.
"""


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


class Conflict(MvllmError):
    """The object exists already, or is in a state that forbids the operation."""


class ResourceExhausted(MvllmError):
    """Not enough devices, ports or slots are free for the request."""


class UnitError(MvllmError):
    """The unit manager (systemd, or the built-in supervisor) refused or failed an operation."""
