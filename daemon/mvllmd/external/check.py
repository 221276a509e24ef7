"""The checks of `mvllmctl attach`, against the server itself: it answers, takes the key, and serves
the model (the one it lists, when none is named)."""

from __future__ import annotations

import httpx

from mvllmd.errors import Conflict, InvalidRequest, Unreachable

TIMEOUT_S = 10.0


async def served_model(url: str, requested: str, api_key: str) -> str:
    """The model to use: `requested`, if the server lists it; else the only one it lists."""
    served = await _list_models(url, api_key)
    if requested:
        if requested not in served:
            raise InvalidRequest(f"{url} does not serve model {requested!r}; it serves: {', '.join(served) or 'none'}")
        return requested
    if len(served) != 1:
        listed = ", ".join(served) or "no model"
        raise InvalidRequest(f"{url} serves {listed}; pass --model to say which one to use")
    return served[0]


async def _list_models(url: str, api_key: str) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=TIMEOUT_S) as client:
            response = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise Unreachable(f"cannot reach {url} ({_reason(exc)}); is the server running, and reachable from "
                          "mvllmd's host?") from None  # fmt: skip
    if response.status_code in (401, 403):
        hint = "the key given is refused" if api_key else "it wants an API key: pass --api-key-env VAR"
        raise InvalidRequest(f"{url} answered /v1/models with {response.status_code}: {hint}")
    if response.status_code != 200:
        raise Conflict(f"{url} answered /v1/models with {response.status_code}; is it an OpenAI-compatible server?")
    try:
        return sorted({str(m["id"]) for m in response.json()["data"]})
    except (ValueError, KeyError, TypeError):
        raise Conflict(f"{url} answered /v1/models with something that is not a model list") from None


def _reason(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {TIMEOUT_S:g}s"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or no route"
    return type(exc).__name__
