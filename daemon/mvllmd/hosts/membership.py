"""Who this daemon's peers are: what it was told, in its config (`[[fleet.hosts]]`) and by
`mvllmctl hosts add` (kept in the state directory, `hosts.json`). There is no discovery and no
consensus: a daemon coordinates the peers it was told of.

A host's name is its certificate's (`mvllmd certs host NAME`); its address is the gRPC address, HOST:PORT,
at which it listens with mutual TLS.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from mvllmd.addresses import TcpAddress, parse_address
from mvllmd.errors import AddressError, ConfigError, Conflict, InvalidRequest, NotFound, storage_error

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
FILE = "hosts.json"


class Source(StrEnum):
    CONFIG = "config"  # [[fleet.hosts]]: changed by editing the config, not by `hosts remove`
    ADDED = "added"  # `mvllmctl hosts add`


@dataclass(frozen=True)
class HostEntry:
    name: str
    address: str  # HOST:PORT
    source: Source = Source.CONFIG


def host_entry(name: object, address: object, source: Source = Source.CONFIG) -> HostEntry:
    """A checked entry; raise ConfigError naming what is wrong."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"host name {name!r}: expected [A-Za-z0-9][A-Za-z0-9._-]{{0,62}} (its certificate's name)")
    try:
        tcp = isinstance(address, str) and isinstance(parse_address(address), TcpAddress)
    except AddressError:
        tcp = False
    if not tcp or not isinstance(address, str):
        raise ConfigError(f"host {name}: address {address!r} must be its gRPC address HOST:PORT, e.g. 10.0.0.2:7070")
    return HostEntry(name, address, source)


def parse_host(text: str) -> HostEntry:
    """`NAME=HOST:PORT` (the --fleet-host flag's form)."""
    name, sep, address = text.partition("=")
    if not sep:
        raise ConfigError(f"--fleet-host {text!r}: expected NAME=HOST:PORT, e.g. gpu-2=10.0.0.2:7070")
    return host_entry(name, address)


class Membership:
    """The peers: the config's, then those added at run time (persisted)."""

    def __init__(self, own_name: str, configured: tuple[HostEntry, ...], state_dir: Path) -> None:
        self.own_name = own_name
        self._path = state_dir / FILE
        self._configured = {e.name: e for e in configured}
        self._added = {e.name: e for e in self._load()}

    def entries(self) -> list[HostEntry]:
        merged = {**self._added, **self._configured}
        return [merged[name] for name in sorted(merged)]

    def add(self, name: str, address: str) -> HostEntry:
        try:
            entry = host_entry(name, address, Source.ADDED)
        except ConfigError as exc:
            raise InvalidRequest(str(exc)) from None
        if name == self.own_name:
            raise InvalidRequest(f"{name} is this host's own name")
        if name in self._configured or name in self._added:
            raise Conflict(f"host {name} is already a peer, at {(self._configured | self._added)[name].address}")
        self._added[name] = entry
        self._save()
        return entry

    def remove(self, name: str) -> HostEntry:
        if name in self._configured:
            raise Conflict(f"host {name} comes from the config file ([[fleet.hosts]]): remove it there")
        entry = self._added.pop(name, None)
        if entry is None:
            raise NotFound(f"no peer named {name}")
        self._save()
        return entry

    def _load(self) -> list[HostEntry]:
        try:
            doc = json.loads(self._path.read_text())
            return [host_entry(h["name"], h["address"], Source.ADDED) for h in doc["hosts"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self._path} is not a hosts file mvllmd wrote ({exc}); move it away") from None

    def _save(self) -> None:
        doc = {"hosts": [{"name": e.name, "address": e.address} for e in self._added.values()]}
        temporary = self._path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps(doc, indent=1))
            os.replace(temporary, self._path)
        except OSError as exc:
            raise storage_error(exc, "writing", self._path) from None
