"""What every command gets: the client for the daemon's address, and the shared `--json` option."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from mvllmctl.client import Client

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Ctl:
    client: Client


pass_ctl = click.make_pass_decorator(Ctl)


def json_option(f: F) -> F:
    """`--json`: the response in the proto3 JSON mapping (snake_case, defaults included)."""
    return click.option("--json", "as_json", is_flag=True, help="Print the response as JSON.")(f)
