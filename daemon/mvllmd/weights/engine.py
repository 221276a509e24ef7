"""vLLM's development routes (VLLM_SERVER_DEV_MODE=1), as the weights' updates call them. Low rate,
so httpx (as the health probes).

The routes take no API key (vLLM's key guards only /v1): an instance with them on binds to loopback
(instances/request.py). Each call raises EngineCallError saying which step failed and what the
engine said.
"""

from __future__ import annotations

from typing import Any

import httpx

MODES = ("keep", "wait", "abort")
CALL_TIMEOUT_S = 600.0  # a reload from a slow disk, a `wait` pause on long requests


class EngineCallError(Exception):
    """A development route failed: the step, and the engine's answer or the transport's error."""


class DevRoutes:
    def __init__(self, url: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._client = httpx.AsyncClient(base_url=url, timeout=timeout_s)

    async def close(self) -> None:
        await self._client.aclose()

    async def pause(self, mode: str) -> None:
        """`keep` freezes the requests in flight; `wait` returns once they finished; `abort` ends them."""
        assert mode in MODES
        await self._call("pause", "POST", "/pause", params={"mode": mode})

    async def resume(self) -> None:
        await self._call("resume", "POST", "/resume")

    async def is_paused(self) -> bool:
        return bool((await self._call("is_paused", "GET", "/is_paused")).get("is_paused"))

    async def reload(self, path: str) -> None:
        """Load the weights at `path` in place (vllm/model_executor/model_loader/reload/inplace.py)."""
        body = {"method": "reload_weights", "kwargs": {"weights_path": path}}
        await self._call("reload", "POST", "/collective_rpc", json=body)

    async def set_version(self, version: str) -> None:
        await self._call("set the version", "POST", "/update_weight_version", json={"new_version": version})

    async def version(self) -> str | None:
        found = (await self._call("weight_info", "GET", "/weight_info")).get("weight_version")
        return None if found is None else str(found)

    async def reset_prefix_cache(self) -> None:
        await self._call("reset the prefix cache", "POST", "/reset_prefix_cache")

    async def sleep(self, level: int, mode: str) -> None:
        """A pause as `mode` says, then (level 1) the weights offloaded and the KV cache dropped, or
        (level 2) both dropped (vllm/entrypoints/serve/dev/sleep/api_router.py)."""
        assert mode in MODES
        await self._call("sleep", "POST", "/sleep", params={"level": str(level), "mode": mode})

    async def wake(self, *tags: str) -> None:
        """Wake what `tags` name ("weights", "kv_cache"), or everything; awake, it resumes."""
        await self._call("wake", "POST", "/wake_up", params=[("tags", tag) for tag in tags])

    async def _call(self, step: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise EngineCallError(f"{step}: {type(exc).__name__}: {exc}"[:300]) from None
        if response.status_code == 404:
            raise EngineCallError(f"{step}: {path} is not served (the engine runs without VLLM_SERVER_DEV_MODE=1)")
        if response.status_code >= 300:
            raise EngineCallError(f"{step}: HTTP {response.status_code}: {_said(response)}")
        try:
            answer = response.json() if response.content else {}
        except ValueError:
            return {}
        return answer if isinstance(answer, dict) else {}


def _said(response: httpx.Response) -> str:
    """What the engine said of an error, briefly."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else error or body.get("detail") or body
        return str(message)[:300]
    return str(body)[:300]
