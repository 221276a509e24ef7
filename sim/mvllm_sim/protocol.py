"""vLLM's OpenAI-compatible request and response formats, as far as mvllm uses them.

`parse_completion` and `parse_chat` turn a JSON body into a `Job`, or raise `ApiError` with vLLM's
status code and message. Responses are built here too, in vLLM 0.32's shapes, including the error
envelope `{"error": {"message", "type", "param", "code"}}` where `code` is the HTTP status.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mvllm_sim.text import Output, chat_prompt, token_ids

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest default; chat defaults to the context left


class ApiError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.status,
            }
        }


def not_found_model(model: str, served: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist. Valid aliases: {served}.", "NotFoundError", "model")


@dataclass(frozen=True)
class Sampling:
    n: int
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    logprobs: int | None  # completions: top-k count; chat: top_logprobs when logprobs is true
    stream: bool
    include_usage: bool
    return_token_ids: bool
    stream_interval: int  # tokens a streamed choice gathers per chunk (the first and last go at once)


@dataclass(frozen=True)
class Job:
    """One parsed request: the prompts (several for a batched completions prompt) and sampling."""

    chat: bool
    model: str
    prompts: tuple[str, ...]
    prompt_ids: tuple[tuple[int, ...], ...]
    sampling: Sampling

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompt_ids)


def parse_completion(body: Any, served: str, max_model_len: int) -> Job:
    body = _object(body)
    model = _model(body, served)
    raw = body.get("prompt")
    if raw is None:
        raise ApiError(
            400, "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)", param="prompt"
        )
    prompts: list[str]
    ids: list[tuple[int, ...]]
    if isinstance(raw, str):
        prompts, ids = [raw], [tuple(token_ids(raw))]
    elif isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        prompts, ids = list(raw), [tuple(token_ids(p)) for p in raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
        prompts, ids = [" ".join(map(str, raw))], [tuple(raw)]
    else:
        raise ApiError(400, "prompt must be a string, a list of strings or a list of token ids", param="prompt")
    if any(not p for p in ids):
        raise ApiError(400, "The prompt cannot be empty.", param="prompt")
    sampling = _sampling(body, logprobs=_opt_int(body, "logprobs", 0, 20), default_max=COMPLETIONS_DEFAULT_MAX_TOKENS)
    for p in ids:
        _check_length(len(p), sampling.max_tokens, max_model_len)
    return Job(False, model, tuple(prompts), tuple(ids), sampling)


def parse_chat(body: Any, served: str, max_model_len: int) -> Job:
    body = _object(body)
    model = _model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    pairs = [_message(m) for m in messages]
    prompt = chat_prompt(pairs)
    top = _opt_int(body, "top_logprobs", 0, 20)
    wants = _opt_bool(body, "logprobs", False)
    sampling = _sampling(body, logprobs=(top or 0) if wants else None, default_max=None)
    ids = tuple(token_ids(prompt))
    _check_length(len(ids), sampling.max_tokens, max_model_len)
    return Job(True, model, (prompt,), (ids,), sampling)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _model(body: dict[str, Any], served: str) -> str:
    model = body.get("model", served)
    if model is None:
        return served
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    if model != served:
        raise not_found_model(model, served)
    return model


def _message(raw: Any) -> tuple[str, str]:
    if not isinstance(raw, dict) or not isinstance(raw.get("role"), str):
        raise ApiError(400, "each message needs a string role and a content", param="messages")
    content = raw.get("content")
    if content is None:
        content = ""
    if isinstance(content, list):  # content parts: keep the text ones
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        raise ApiError(400, "message content must be a string or a list of text parts", param="messages")
    return raw["role"], content


def _sampling(body: dict[str, Any], logprobs: int | None, default_max: int | None) -> Sampling:
    n = _opt_int(body, "n", None, None)
    if n is None:
        n = 1
    if n < 1:
        raise ApiError(400, f"n must be at least 1, got {n}.")
    max_tokens = _opt_int(body, "max_tokens", None, None)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_completion_tokens", None, None)
    if max_tokens is None:
        max_tokens = default_max
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
    temperature = _opt_float(body, "temperature", 1.0)
    top_p = _opt_float(body, "top_p", 1.0)
    if temperature < 0:
        raise ApiError(400, f"temperature must be non-negative, got {temperature}.", param="temperature")
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}.", param="top_p")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return Sampling(
        n=n,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=_opt_int(body, "seed", None, None),
        stop=stops,
        ignore_eos=_opt_bool(body, "ignore_eos", False),
        logprobs=logprobs,
        stream=_opt_bool(body, "stream", False),
        include_usage=bool(options.get("include_usage", False)),
        return_token_ids=_opt_bool(body, "return_token_ids", False),
        stream_interval=_opt_int(body, "stream_interval", 1, None) or 1,
    )


def _check_length(prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
    if max_tokens is not None and max_tokens > max_model_len:
        raise ApiError(
            400,
            f"max_tokens={max_tokens} cannot be greater than max_model_len={max_model_len}. Please request fewer "
            f"output tokens. (parameter=max_tokens, value={max_tokens})",
            param="max_tokens",
        )
    wanted = prompt_len + (max_tokens or 0)
    if prompt_len >= max_model_len or wanted > max_model_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{wanted} tokens ({prompt_len} in the messages, {max_tokens or 0} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="max_tokens",
        )


def _opt_int(body: dict[str, Any], key: str, low: int | None, high: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key} must be an integer, got {value!r}", param=key)
    if high is None and low is not None and value < low:
        raise ApiError(400, f"{key} must be at least {low}, got {value}", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"{key} must be between {low} and {high}, got {value}", param=key)
    return value


def _opt_float(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"{key} must be a number, got {value!r}", param=key)
    return float(value)


def _opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false, got {value!r}", param=key)
    return value


# --- responses -----------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def words_as_tokens(words: Sequence[str], continued: bool, start: int = 0) -> list[str]:
    """Words `start`, `start` + 1, ... of an answer as tokens: each word is one token, whose text
    carries the space before it (none before the first of an answer; a continued answer's first word
    follows the words of the prompt, and has one)."""
    return [w if start + i == 0 and not continued else f" {w}" for i, w in enumerate(words)]


def logprobs_block(chat: bool, tokens: Sequence[str], top: int, offset: int = 0) -> dict[str, Any]:
    values = [-((hash(t) % 1000) / 250.0) for t in tokens]  # deterministic stand-ins, <= 0
    if chat:
        return {
            "content": [
                {
                    "token": t,
                    "logprob": v,
                    "bytes": list(t.encode()),
                    "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}][:top],
                }
                for t, v in zip(tokens, values, strict=True)
            ]
        }
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": list(tokens),
        "token_logprobs": values,
        "top_logprobs": [{t: v} for t, v in zip(tokens, values, strict=True)] if top else None,
        "text_offset": offsets,
    }


def choice_body(job: Job, index: int, output: Output, prompt_ids: Sequence[int]) -> dict[str, Any]:
    tokens = words_as_tokens(output.words, output.continued)
    text = "".join(tokens)
    lp = logprobs_block(job.chat, tokens, job.sampling.logprobs) if job.sampling.logprobs is not None else None
    base: dict[str, Any] = {
        "index": index,
        "logprobs": lp,
        "finish_reason": output.finish_reason,
        "stop_reason": None,
    }
    if job.chat:
        base["message"] = {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": []}
    else:
        base["text"] = text
        base["prompt_logprobs"] = None
    wants_ids = job.sampling.return_token_ids
    base["token_ids"] = token_ids(text) if wants_ids else None
    if not job.chat:
        base["prompt_token_ids"] = list(prompt_ids) if wants_ids else None
    return base


def response_body(job: Job, outputs: Sequence[Output]) -> dict[str, Any]:
    per_prompt = job.sampling.n
    choices = [choice_body(job, i, out, job.prompt_ids[i // per_prompt]) for i, out in enumerate(outputs)]
    completion_tokens = sum(len(o.words) for o in outputs)
    body: dict[str, Any] = {
        "id": new_id(job.chat),
        "object": "chat.completion" if job.chat else "text_completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": choices,
        "usage": usage(job.prompt_tokens, completion_tokens),
    }
    if job.chat and job.sampling.return_token_ids:
        body["prompt_token_ids"] = list(job.prompt_ids[0])
    return body
