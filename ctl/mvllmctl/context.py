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


def _hosts_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str]:
    if value is None:
        return []
    names = [n.strip() for n in value.split(",")]
    if not all(names) or ("all" in names and len(names) > 1):
        raise click.BadParameter("NAME[,NAME...] or all", ctx, param)
    return names


def hosts_option(help_text: str) -> Callable[[F], F]:
    """`--hosts NAME[,NAME...]|all`: the fleet hosts a command acts on (mvllmctl hosts lists them); without
    it, the daemon's own host."""

    def decorate(f: F) -> F:
        option = click.option("--hosts", "hosts", metavar="NAME[,NAME...]|all", callback=_hosts_list, help=help_text)
        return option(f)

    return decorate


def qualified(name: str, host: str) -> str:
    """An instance as output shows it: HOST/NAME (a bare NAME where the daemon gave no host)."""
    return f"{host}/{name}" if host else name
