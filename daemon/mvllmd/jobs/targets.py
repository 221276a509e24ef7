"""Where a job's requests go: this daemon's READY instances of the job's model, or servers named by URL.

Instances are matched by their served model name or by the model they were launched with; the job
then asks for the served name. Servers named by URL (the seed script's comma-separated list) may be
given with or without the /v1 suffix; without --model, they are asked which model they serve.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from mvllmd.errors import Conflict, InvalidRequest
from mvllmd.instances.manager import InstanceManager
from mvllmd.instances.spec import InstanceState
from mvllmd.instances.state import LIVE
from mvllmd.transport import http
from mvllmd.transport.requests import bearer

MODELS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Target:
    url: str  # base URL, without /v1
    capacity: int  # max_num_seqs
    api_key: str = ""
    instance: str = ""  # the instance's name, for this daemon's own


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


def instance_model(instances: InstanceManager, requested: str, waiting: bool = False) -> str:
    """The served model name a job asks this daemon's instances for; raise saying what is served.

    A job that may wait for instances (`waiting`) is taken while none runs yet, if it names its model:
    it waits for an instance that serves that name."""
    live = [v.spec for v in instances.list_instances() if v.state in LIVE]
    served = sorted({s.served_model_name for s in live})
    if not live and waiting:
        if not requested:
            raise InvalidRequest("no instance runs yet to say which model to wait for; pass --model")
        return requested
    if not live:
        raise Conflict("no instance is running; launch one (mvllmctl launch MODEL) or pass --endpoints URL,...")
    if not requested:
        if len(served) > 1:
            raise InvalidRequest(f"the instances serve several models ({', '.join(served)}); pass --model")
        return served[0]
    for spec in live:
        if requested in (spec.served_model_name, spec.model):
            return spec.served_model_name
    raise InvalidRequest(f"no instance serves model {requested!r}; served: {', '.join(served)}")


def instance_targets(instances: InstanceManager, model: str, *states: InstanceState) -> list[Target]:
    """This daemon's instances of `model` in these states (READY unless told)."""
    return [
        Target(view.spec.url, view.spec.max_num_seqs, key, view.spec.name)
        for view, key in instances.serving(*states)
        if view.spec.served_model_name == model
    ]


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
