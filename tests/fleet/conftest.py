"""The fleet's tests' shared fixture: the coordinator of a module's `fleet`, left with no instance."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleetkit import FleetDaemon


@pytest.fixture
def coordinator(fleet: list[FleetDaemon]) -> Iterator[FleetDaemon]:
    """Host 1 of the module's `fleet` (which each module makes, with the hosts it needs); after the test,
    every instance on every host is stopped."""
    yield fleet[0]
    done = fleet[0].ctl("stop", "--all", "--hosts", "all")
    assert done.returncode == 0, done.stderr
