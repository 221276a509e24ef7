"""mvllmctl's exit statuses (in the manner of httpie's ExitStatus). Stable across releases."""

from __future__ import annotations

import enum

import grpc


class ExitStatus(enum.IntEnum):
    SUCCESS = 0
    FAILED = 1  # the daemon ran the operation and it failed
    USAGE = 2  # usage error or invalid input
    UNREACHABLE = 3  # the daemon cannot be reached, or a server it was asked to reach (attach)
    EXHAUSTED = 4  # not enough devices, ports or slots; a file system full
    INTERRUPTED = 130  # Ctrl-C


HELP = """\b
Exit status:
  0    success
  1    the operation failed
  2    usage error or invalid input
  3    mvllmd is unreachable (or a server it was asked to attach)
  4    resources exhausted (devices, ports, slots, disk space)
  130  interrupted"""


def for_status_code(code: grpc.StatusCode) -> ExitStatus:
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return ExitStatus.USAGE
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ExitStatus.EXHAUSTED
    if code is grpc.StatusCode.UNAVAILABLE:
        return ExitStatus.UNREACHABLE
    if code is grpc.StatusCode.CANCELLED:
        return ExitStatus.INTERRUPTED
    return ExitStatus.FAILED
