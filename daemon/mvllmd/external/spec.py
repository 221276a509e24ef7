"""An external server's spec: its name, URL, model and batch limit; the URL's and the name's checks.

The spec is what `mvllmctl attach` settled, written as JSON in the state directory (store.py); the
server's API key is not part of it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mvllmd.errors import InvalidRequest

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class ExternalSpec:
    name: str
    url: str  # base URL, without /v1
    model: str  # the served model name
    max_num_seqs: int
    attached_at: float = field(default_factory=time.time)

    @property
    def served_model_name(self) -> str:  # as an instance's spec says it, for the prober
        return self.model

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ExternalSpec:
        raw: dict[str, Any] = json.loads(text)
        return cls(**raw)


def parse_url(text: str) -> str:
    """`http[s]://host[:port][/v1][/]` -> `http[s]://host[:port]`; InvalidRequest for anything else."""
    url = text.strip().rstrip("/").removesuffix("/v1").rstrip("/")
    hint = "give a URL like http://10.0.0.5:8000 (with or without /v1)"
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise InvalidRequest(f"{text!r} is not an http:// or https:// URL; {hint}")
    if not parts.hostname:
        raise InvalidRequest(f"{text!r} names no host; {hint}")
    try:
        port = parts.port
    except ValueError:
        raise InvalidRequest(f"{text!r}: the port is not a number from 1 to 65535") from None
    if port == 0:
        raise InvalidRequest(f"{text!r}: the port is not a number from 1 to 65535")
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidRequest(f"{text!r}: only a scheme, a host and a port (and /v1) are expected; {hint}")
    return url


def default_name(url: str) -> str:
    """A name from the URL's host and port: http://10.0.0.5:8000 -> 10-0-0-5-8000."""
    parts = urlsplit(url)
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    slug = re.sub(r"[^a-z0-9]+", "-", f"{parts.hostname}-{port}".lower()).strip("-")
    return slug[-63:].lstrip("-")


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"the name {name!r} is not allowed: lower-case letters, digits and '-', starting with a letter "
            "or digit, at most 63 characters"
        )
