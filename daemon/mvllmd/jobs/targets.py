"""Where a job's requests go: the daemon's READY servers of the job's model (its instances and the
external servers attached to it: fleet.py), or servers named by URL.

The daemon's servers are matched by their served model name, or an instance by the model it was
launched with; the job then asks for the served name. Servers named by URL (the seed script's
comma-separated list) may be given with or without the /v1 suffix; without --model, they are asked
which model they serve.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from mvllmd.errors import Conflict, InvalidRequest
from mvllmd.fleet import Fleet
from mvllmd.transport import http
from mvllmd.transport.requests import bearer

MODELS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Target:
    url: str  # base URL, without /v1
    capacity: int  # max_num_seqs
    api_key: str = ""
    instance: str = ""  # the server's name, for the daemon's own (instances, external servers)


def normalize_url(text: str) -> str:
    """`http://host:port[/v1][/]` -> `http://host:port`; InvalidRequest for anything else."""
    url = text.strip().rstrip("/")
    url = url.removesuffix("/v1").rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"endpoint {text!r}: give a URL like http://10.0.0.5:8000 (with or without /v1)")
    try:
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        raise InvalidRequest(f"endpoint {text!r}: the port is not a number from 1 to 65535") from None
    if parts.path or parts.query or parts.fragment:
        raise InvalidRequest(f"endpoint {text!r}: only scheme, host and port (and /v1) are expected")
    return url


def instance_model(fleet: Fleet, requested: str, waiting: bool = False) -> str:
    """The served model name a job asks the daemon's servers for; raise saying what is served.

    A job that may wait for instances (`waiting`) is taken while none runs yet, if it names its model:
    it waits for a server of that name."""
    live = fleet.live()
    served = sorted({s.model for s in live})
    if not live and waiting:
        if not requested:
            raise InvalidRequest("no instance runs yet to say which model to wait for; pass --model")
        return requested
    if not live:
        raise Conflict(
            "no instance is running; launch one (mvllmctl launch MODEL), attach a server (mvllmctl attach URL) "
            "or pass --endpoints URL,..."
        )
    if not requested:
        if len(served) > 1:
            raise InvalidRequest(f"the daemon's servers serve several models ({', '.join(served)}); pass --model")
        return served[0]
    for server in live:
        if requested in (server.model, server.launched_as):
            return server.model
    raise InvalidRequest(f"no instance serves model {requested!r}; served: {', '.join(served)}")


def instance_targets(fleet: Fleet, model: str) -> list[Target]:
    """The daemon's READY servers of `model`: its instances and the external servers attached to it."""
    return [Target(s.url, s.capacity, s.api_key, s.name) for s in fleet.ready() if s.model == model]


async def endpoint_model(urls: list[str], requested: str, api_key: str = "") -> str:
    """The model to ask servers named by URL for: `requested`, checked against what they list, or
    the only one they serve. Servers that do not answer are not held against the job."""
    client = http.Client()
    try:
        answers = await asyncio.gather(*(_models(client, url, api_key) for url in urls))
    finally:
        client.close()
    listed = [models for models in answers if models is not None]
    served = sorted({m for models in listed for m in models})
    if requested:
        if listed and requested not in served:
            raise InvalidRequest(f"the endpoints do not serve model {requested!r}; they serve: {', '.join(served)}")
        return requested
    if not listed:
        raise InvalidRequest(f"none of the endpoints ({', '.join(urls)}) answered /v1/models; pass --model")
    if len(served) != 1:
        raise InvalidRequest(f"the endpoints serve {', '.join(served) or 'no model'}; pass --model")
    return served[0]


async def _models(client: http.Client, url: str, api_key: str) -> list[str] | None:
    try:
        async with asyncio.timeout(MODELS_TIMEOUT_S):
            response = await client.pool(url).get("/v1/models", bearer(api_key) or {})
        if response.status != 200:
            return None
        return [str(m["id"]) for m in json.loads(response.body)["data"]]
    except (http.HttpError, OSError, TimeoutError, ValueError, KeyError, TypeError):
        return None
