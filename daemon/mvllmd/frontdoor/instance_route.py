"""`/i/NAME/PATH`: one of this host's instances, for the coordinators of the fleet.

Engines listen on loopback only: vLLM's --api-key guards only its /v1 paths, while /metrics, /tokenize
and, in development mode, /collective_rpc or /pause answer anyone who reaches the port. Another host's
mvllmd reaches them through this route instead, on this daemon's HTTP listener:

- it wants `Authorization: Bearer TOKEN`, a token this daemon gave a peer daemon at JoinFleet
  (hosts/tokens.py), else 401; the front door's own tokens are not accepted here, nor these there;
- it forwards only what a job needs: `/v1/...`, `/metrics`, `/tokenize` and `/detokenize`; any other path
  (vLLM's development routes among them) is 404, and so is a path with anything but letters, digits
  and `/_.-` in it, or a `.` or `..` segment;
- the request goes to the instance with the instance's own API key, its body as it came; the answer
  comes back as it comes, a streamed one chunk by chunk (a streamed answer cut upstream is cut here too,
  so the coordinator sees what it would have seen at the engine). A request whose body does not ask
  for a stream skips the chunk queue: the most common request costs least.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

from mvllm import httpd
from mvllmd.hosts.tokens import RouteTokens
from mvllmd.transport import http
from mvllmd.transport.requests import bearer

PREFIX = "/i/"
PATH = re.compile(r"/i/([a-z0-9][a-z0-9-]{0,62})(/[A-Za-z0-9/_.-]*)")
FORWARDED = ("/v1/", "/metrics", "/tokenize", "/detokenize")
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STREAM_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}

Lookup = Callable[[str], tuple[str, str] | None]  # instance name -> (its URL, its API key)


def _error(status: int, message: str) -> httpd.Response:
    return httpd.json_response({"error": {"message": message, "type": "InstanceRouteError", "code": status}}, status)


def _forwarded(rest: str) -> bool:
    if any(segment in (".", "..") for segment in rest.split("/")) or "//" in rest:
        return False
    return rest.startswith("/v1/") or rest in FORWARDED


class InstanceRoute:
    def __init__(self, lookup: Lookup, tokens: RouteTokens, client: http.Client) -> None:
        self._lookup, self._tokens, self._client = lookup, tokens, client

    async def handle(self, request: httpd.Request) -> httpd.Response:
        scheme, _, offered = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self._tokens.valid(offered.strip()):
            return _error(401, "the per-instance routes want a peer daemon's route token (FleetService.JoinFleet)")
        match = PATH.fullmatch(request.path)
        if match is None or not _forwarded(match[2]):
            return _error(
                404, "not a route of this daemon's instances: /i/NAME/v1/..., /metrics, /tokenize, /detokenize"
            )
        name, rest = match[1], match[2]
        target = self._lookup(name)
        if target is None:
            return _error(404, f"no instance named {name} on this host")
        url, api_key = target
        if request.query:
            rest = f"{rest}?{request.query}"
        pool = self._client.pool(url)
        if request.method == "GET":
            return await self._whole(pool.get(rest, bearer(api_key) or {}), rest)
        headers = {"Content-Type": "application/json", **(bearer(api_key) or {})}
        if b'"stream"' not in request.body:
            return await self._whole(pool.post(rest, request.body, headers), rest)
        return await _streamed(request, pool, rest, headers)

    async def _whole(self, answer: Awaitable[http.Response], rest: str) -> httpd.Response:
        try:
            response = await answer
        except (http.HttpError, OSError, TimeoutError) as exc:
            return _error(502, f"the instance did not answer: {exc or type(exc).__name__}")
        kind = METRICS_TYPE if rest.startswith("/metrics") else "application/json"
        return httpd.Response(response.status, response.body, kind)


async def _streamed(request: httpd.Request, pool: http.Pool, rest: str, headers: dict[str, str]) -> httpd.Response:
    chunks: asyncio.Queue[bytes] = asyncio.Queue()
    post = asyncio.ensure_future(pool.post(rest, request.body, headers, chunks.put_nowait))
    stream: httpd.Stream | None = None
    try:
        while True:
            getter = asyncio.ensure_future(chunks.get())
            await asyncio.wait({post, getter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            stream = stream or await request.stream(STREAM_HEADERS)
            await stream.write(getter.result())
        while not chunks.empty():
            stream = stream or await request.stream(STREAM_HEADERS)
            await stream.write(chunks.get_nowait())
        response = post.result()
    except (http.HttpError, OSError, TimeoutError) as exc:
        if stream is not None:
            request.cut()  # cut mid-way upstream: cut here too
            return stream
        return _error(502, f"the instance did not answer: {exc or type(exc).__name__}")
    finally:
        post.cancel()  # the coordinator left: the engine aborts the request
    return stream or httpd.Response(response.status, response.body)
