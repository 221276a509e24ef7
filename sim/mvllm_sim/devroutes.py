"""vLLM 0.32's development routes (served with VLLM_SERVER_DEV_MODE=1; 404 without), over the
engine's controls (control.py, which tells what each does). Requests and answers, as vLLM's
(vllm/entrypoints/serve/dev and vllm/entrypoints/rl/online):

    POST /pause?mode=abort|wait|keep&clear_cache=true  -> {"status": "paused"}        (mode: abort)
    POST /resume                                       -> {"status": "resumed"}
    GET  /is_paused                                    -> {"is_paused": false}
    POST /sleep?level=0|1|2&mode=abort|wait|keep       -> {"status": "sleeping", "level": 1}  (1, abort)
    POST /wake_up[?tags=weights&tags=kv_cache]         -> {"status": "awake", "tags": null}
                                                          ("sleeping" while a tag still sleeps)
    GET  /is_sleeping                                  -> {"is_sleeping": false}
    POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}
                                                       -> {"results": [null]}  (one per TP worker)
    POST /update_weight_version {"new_version": "v2"}  -> {"success": true, "new_version": "v2"}
    GET  /weight_info                                  -> {"weight_version": "default"} (until set)
    POST /reset_prefix_cache?reset_running_requests=false -> {"success": true}
                                                          (false while running requests hold KV)

Errors, in vLLM's envelope {"error": {"message", "type", "param", "code"}}: a query parameter or body
field FastAPI would refuse is 400 "Bad Request" with its pydantic message and `param` ("query.mode");
collective_rpc's own checks are 400 ("Missing 'method' in request body"); a failed call (a reload from
a path that is not a directory, any method but reload_weights) is 500 InternalServerError, "Call to
collective_rpc method failed: ...", and the connection then closes, as uvicorn closes it after the
unhandled exception vLLM raises there. None of these routes needs the API key: vLLM's guards /v1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import parse_qs

from mvllm.httpd import Request, Response, json_response
from mvllm_sim.control import Control, PauseMode
from mvllm_sim.protocol import ApiError
from mvllm_sim.weights import WeightsError

Route = Callable[[Request], Awaitable[Response]]
PAUSE_MODES = ("abort", "wait", "keep")
RELOAD_KWARGS = {"weights_path", "is_checkpoint_format", "weights_iterator"}
INT_PARSING = "Input should be a valid integer, unable to parse string as an integer"
_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def dev_routes(control: Control) -> dict[tuple[str, str], Route]:
    """The routes, by method and path, for the server's route table."""
    return {
        ("POST", "/pause"): lambda r: _pause(control, r),
        ("POST", "/resume"): lambda r: _resume(control),
        ("GET", "/is_paused"): lambda r: _answer({"is_paused": control.paused}),
        ("POST", "/sleep"): lambda r: _sleep(control, r),
        ("POST", "/wake_up"): lambda r: _wake_up(control, r),
        ("GET", "/is_sleeping"): lambda r: _answer({"is_sleeping": control.asleep}),
        ("POST", "/collective_rpc"): lambda r: _collective_rpc(control, r),
        ("POST", "/update_weight_version"): lambda r: _update_weight_version(control, r),
        ("GET", "/weight_info"): lambda r: _answer({"weight_version": control.weight_version}),
        ("POST", "/reset_prefix_cache"): lambda r: _reset_prefix_cache(control, r),
    }


async def _answer(payload: Any) -> Response:
    return json_response(payload)


async def _pause(control: Control, request: Request) -> Response:
    query = query_params(request)
    mode = _mode(query)
    await control.pause(mode, _bool(query, "clear_cache", True))
    return json_response({"status": "paused"})


async def _resume(control: Control) -> Response:
    control.resume()
    return json_response({"status": "resumed"})


async def _sleep(control: Control, request: Request) -> Response:
    query = query_params(request)
    level = _level(query)
    await control.sleep(level, _mode(query))
    return json_response({"status": "sleeping", "level": level})


async def _wake_up(control: Control, request: Request) -> Response:
    tags = query_params(request).get("tags") or None
    awake = control.wake_up(tags)
    return json_response({"status": "awake" if awake else "sleeping", "tags": tags})


async def _reset_prefix_cache(control: Control, request: Request) -> Response:
    query = query_params(request)
    _bool(query, "reset_external", False)  # no external (connector) cache here: checked, then moot
    return json_response({"success": control.reset_prefix_cache(_bool(query, "reset_running_requests", False))})


async def _update_weight_version(control: Control, request: Request) -> Response:
    body = _json(request, lambda exc: _invalid("body", "json_invalid", f"JSON decode error: {exc}", ""))
    version = body.get("new_version") if isinstance(body, dict) else None
    if version is None:
        raise _invalid("body.new_version", "missing", "Field required", "None")
    if not isinstance(version, str):
        raise _invalid("body.new_version", "string_type", "Input should be a valid string", version)
    control.weight_version = version
    return json_response({"success": True, "new_version": version})


async def _collective_rpc(control: Control, request: Request) -> Response:
    body = _json(request, lambda exc: ApiError(400, f"JSON decode error: {exc}", "Bad Request"))
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object", "Bad Request")
    method = body.get("method")
    if method is None:
        raise ApiError(400, "Missing 'method' in request body", "Bad Request")
    kwargs = body.get("kwargs") or {}
    if method != "reload_weights":
        raise _rpc_failed(request, f"'Worker' object has no attribute '{method}'")
    if not isinstance(kwargs, dict):
        raise _rpc_failed(request, f"reload_weights() argument after ** must be a mapping, not {type(kwargs).__name__}")
    if unexpected := sorted(set(kwargs) - RELOAD_KWARGS):
        raise _rpc_failed(request, f"reload_weights() got an unexpected keyword argument '{unexpected[0]}'")
    path = kwargs.get("weights_path")
    try:
        results = await control.reload(str(path) if path is not None else None)
    except WeightsError as exc:
        raise _rpc_failed(request, str(exc)) from None
    return json_response({"results": results})


def query_params(request: Request) -> dict[str, list[str]]:
    return parse_qs(request.query, keep_blank_values=True)


def _last(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _mode(query: dict[str, list[str]]) -> PauseMode:
    mode = _last(query, "mode")
    if mode is None:
        return "abort"
    if mode not in PAUSE_MODES:
        expected = "'abort', 'wait' or 'keep'"
        raise _invalid("query.mode", "literal_error", f"Input should be {expected}", mode, {"expected": expected})
    return cast(PauseMode, mode)


def _level(query: dict[str, list[str]]) -> int:
    raw = _last(query, "level")
    if raw is None:
        return 1
    try:
        level = int(raw)
    except ValueError:
        raise _invalid("query.level", "int_parsing", INT_PARSING, raw) from None
    if not 0 <= level <= 2:
        word, key, bound = ("greater", "ge", 0) if level < 0 else ("less", "le", 2)
        raise _invalid("query.level", f"{word}_than_equal", f"Input should be {word} than or equal to {bound}", raw,
                       {key: bound})  # fmt: skip
    return level


def _bool(query: dict[str, list[str]], name: str, default: bool) -> bool:
    raw = _last(query, name)
    if raw is None:
        return default
    if raw.lower() in _TRUE | _FALSE:
        return raw.lower() in _TRUE
    raise _invalid(f"query.{name}", "bool_parsing", "Input should be a valid boolean, unable to interpret input", raw)


def _json(request: Request, refusal: Callable[[ValueError], ApiError]) -> Any:
    try:
        return json.loads(request.body)
    except ValueError as exc:  # UnicodeDecodeError is one
        raise refusal(exc) from None


def _invalid(loc: str, kind: str, message: str, value: Any, ctx: dict[str, Any] | None = None) -> ApiError:
    """FastAPI's refusal of a request field, as vLLM's validation handler words it."""
    error: dict[str, Any] = {"type": kind, "loc": loc, "msg": message, "input": value}
    if ctx is not None:
        error["ctx"] = ctx
    return ApiError(400, f"1 validation error:\n  {error!r}", "Bad Request", loc)


def _rpc_failed(request: Request, error: str) -> ApiError:
    """A failed collective_rpc as vLLM (multiprocess executor) reports it; the connection closes after."""
    request.keep_alive = False
    message = (
        f"Call to collective_rpc method failed: Worker failed with error '{error}', "
        "please check the stack trace above for the root cause"
    )
    return ApiError(500, _sanitized(message), "InternalServerError")


def _sanitized(message: str) -> str:
    """vLLM's sanitize_message: file paths in an error message read <path>."""
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    return re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message).strip()
