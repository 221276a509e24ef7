"""The front door's HTTP routes, on the small HTTP/1.1 server the simulator uses (mvllm.httpd).

This layer only translates: HTTP in, a proxy.Call out; errors in vLLM's envelope
(`{"error": {"message", "type", "param", "code"}}`) with vLLM's status codes. Routes:

- `POST /v1/completions`, `POST /v1/chat/completions`: forwarded (proxy.py), streamed or not;
- `POST /tokenize`, `POST /detokenize`: forwarded to a server of the body's model (vLLM's own routes);
- `GET /v1/models`: the models some READY server serves;
- `GET /health`: 200 while some server is READY, else 503;
- `GET /metrics`: mvllmd's own Prometheus metrics (metrics/prometheus.py).

A request with `X-Session-ID` (or the body's `user`) is sticky-least-loaded (servers.py).

Under `/i/NAME/` are the per-instance routes by which the fleet's coordinators reach this host's
instances (instance_route.py), with their own tokens. A listener off loopback without the front door's
tokens (allowed only to a daemon with mutual TLS, the fleet's) serves those routes alone: its other
routes answer 401.

Every other path is 404: vLLM's development routes (`/collective_rpc`, `/pause`, `/sleep`,
`/update_weights`, ...) are never forwarded. With tokens (`--http-token-file`), every route but
/health wants `Authorization: Bearer TOKEN`, compared in constant time. Without tokens, a model whose
servers want an API key is refused (403): the front door must not hand their servers to anyone who
can reach it. /metrics wants the token too when there are tokens (it names the servers and models;
Prometheus sends it with `authorization: credentials_file`, examples/prometheus.yml), unlike vLLM's
own /metrics, which its --api-key leaves open; without tokens (loopback only) it is open.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from http import HTTPStatus
from ssl import SSLContext
from typing import Any

from mvllm import httpd
from mvllmd.frontdoor.instance_route import PREFIX, InstanceRoute
from mvllmd.frontdoor.proxy import VERSION_HEADER, Call, NoServer, Sink, forward
from mvllmd.frontdoor.servers import Servers
from mvllmd.metrics.prometheus import CONTENT_TYPE, Metrics
from mvllmd.transport import http

MAX_BODY = 32 * 1024 * 1024  # a request body over this is refused (413)
RETRY_AFTER_S = 5  # what a 503 for "no server" tells the client
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 413: "BadRequestError", 503: "ServiceUnavailableError"}  # fmt: skip
TOOLS = frozenset({"/tokenize", "/detokenize"})
STREAM_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> httpd.Response:
    kind = ERROR_TYPES.get(status, HTTPStatus(status).phrase.replace(" ", ""))
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return httpd.Response(status, json.dumps(body).encode(), headers=headers or {})


class FrontDoor:
    def __init__(self, servers: Servers, tokens: frozenset[str] = frozenset(), metrics: Metrics | None = None,
                 request_timeout_s: float = httpd.REQUEST_TIMEOUT_S,
                 route: InstanceRoute | None = None) -> None:  # fmt: skip
        self.servers = self._servers = servers
        self._tokens = tuple(t.encode() for t in tokens)
        self._client = http.Client()
        self.metrics = metrics or Metrics()
        if metrics is None:
            self.metrics.watch_servers(servers.endpoints)
        self._request_timeout_s = request_timeout_s
        self._routes: dict[tuple[str, str], httpd.Handler] = {
            ("POST", "/v1/completions"): self._generate,
            ("POST", "/v1/chat/completions"): self._generate,
            ("POST", "/tokenize"): self._generate,
            ("POST", "/detokenize"): self._generate,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/metrics"): self._metrics,
        }
        self._servers_http: list[httpd.Server] = []
        self._prefixes = {PREFIX: route.handle} if route is not None else {}

    async def listen(
        self, host: str, port: int, ssl: SSLContext | None = None, fleet_only: bool = False
    ) -> tuple[str, int]:
        """Serve on one more address (`fleet_only`: the per-instance routes alone); return the host and port
        bound (port 0: the one picked)."""
        routes = dict.fromkeys(self._routes, self._fleet_only) if fleet_only else self._routes
        server = httpd.Server(routes, max_body=MAX_BODY, request_timeout_s=self._request_timeout_s,
                              prefixes=self._prefixes)  # fmt: skip
        bound = await server.start(host, port, ssl=ssl)
        self._servers_http.append(server)
        return bound

    async def close(self) -> None:
        for server in self._servers_http:
            await server.close()
        self._client.close()

    # --- routes ------------------------------------------------------------------------------------

    async def _fleet_only(self, request: httpd.Request) -> httpd.Response:
        return error(401, "this listener serves only the fleet's per-instance routes (/i/NAME/...): start mvllmd "
                          "with --http-token-file to serve clients here")  # fmt: skip

    async def _health(self, request: httpd.Request) -> httpd.Response:
        if self._servers.models():
            return httpd.Response(200, b"")
        return error(503, "no server is READY", {"retry-after": str(RETRY_AFTER_S)})

    async def _metrics(self, request: httpd.Request) -> httpd.Response:
        if not self._authorized(request):
            return _unauthorized()
        await asyncio.to_thread(self.metrics.read_gpus)  # NVML blocks; the rest is read on the loop
        return httpd.Response(200, self.metrics.render(), CONTENT_TYPE)

    async def _models(self, request: httpd.Request) -> httpd.Response:
        if not self._authorized(request):
            return _unauthorized()
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "mvllm"} for m in self._servers.models()]
        return httpd.json_response({"object": "list", "data": data})

    async def _generate(self, request: httpd.Request) -> httpd.Response:
        try:
            call = self._call(request)
        except _Refused as refused:
            return refused.response
        stream_out: list[httpd.Stream] = []

        async def start(headers: dict[str, str]) -> None:
            stream_out.append(await request.stream({**STREAM_HEADERS, **headers}))

        async def write(chunk: bytes) -> None:
            await stream_out[0].write(chunk)

        try:
            answer = await forward(self._servers, self._client, call, Sink(start, write), self.metrics)
        except NoServer as exc:
            return error(503, str(exc), {"retry-after": str(RETRY_AFTER_S)})
        if stream_out:
            return stream_out[0]
        return httpd.Response(answer.status, answer.body, headers=answer.headers)

    # --- checks ------------------------------------------------------------------------------------

    def _authorized(self, request: httpd.Request) -> bool:
        if not self._tokens:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        offered = given.strip().encode()
        # Every token is compared, whatever matches: the time taken says nothing of which one did.
        matches = [hmac.compare_digest(offered, token) for token in self._tokens]
        return scheme.lower() == "bearer" and any(matches)

    def _call(self, request: httpd.Request) -> Call:
        """The request as a Call; raise _Refused with the answer for one that cannot go upstream."""
        if not self._authorized(request):
            raise _Refused(_unauthorized())
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Refused(error(400, f"the request body is not JSON: {exc}")) from None
        if not isinstance(body, dict):
            raise _Refused(error(400, "the request body must be a JSON object"))
        model = self._model_of(body)
        if not self._tokens and self._servers.api_keys(model):
            raise _Refused(error(403, f"the servers of {model} want an API key, and this front door has no "
                                      "tokens: start mvllmd with --http-token-file to forward to them"))  # fmt: skip
        if request.path in TOOLS:  # /tokenize, /detokenize: a request that runs no sequence
            return Call(model, request.path, request.body, 0, False, fields=body)
        want, stream = body.get("n", 1), body.get("stream", False)
        if not isinstance(want, int) or isinstance(want, bool) or want < 1 or not isinstance(stream, bool):
            raise _Refused(error(400, "`n` must be a positive integer and `stream` true or false"))
        session = request.headers.get("x-session-id") or body.get("user") or ""
        if not isinstance(session, str):
            raise _Refused(error(400, "`user` must be a string"))
        version = request.headers.get(VERSION_HEADER, "")
        return Call(model, request.path, request.body, want, stream, session, body, version)

    def _model_of(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if isinstance(model, str) and self._servers.serves(model):
            return model  # the common case, without listing every model
        served = self._servers.models()
        listed = ", ".join(served) or "none (no server is READY)"
        if model is None and len(served) == 1:
            return served[0]
        if model is None:
            raise _Refused(error(400, f"name the model; served: {listed}"))
        if not isinstance(model, str):
            raise _Refused(error(400, "`model` must be a string"))
        if not served:
            raise _Refused(error(503, "no server is READY", {"retry-after": str(RETRY_AFTER_S)}))
        raise _Refused(error(404, f"The model `{model}` does not exist. Served: {listed}."))


class _Refused(Exception):
    def __init__(self, response: httpd.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _unauthorized() -> httpd.Response:
    return error(401, "give a token of this front door: Authorization: Bearer TOKEN", {"www-authenticate": "Bearer"})
