"""The HTTP side: vLLM's OpenAI-compatible endpoints over the simulated engine (on mvllm.httpd).

GET /health, /v1/models, /metrics, /version; POST /v1/completions, /v1/chat/completions (with SSE
streaming), /detokenize. A client that disconnects has its request aborted in the engine, as vLLM does. A streamed
choice goes out as vLLM 0.32 sends it: its first token at once, then a chunk per `stream_interval`
tokens (the request's; 1 by default), its last chunk when it ends; with `return_token_ids`, each
chunk holds its tokens' ids and the first the prompt's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mvllm.httpd import Handler, Request, Response, Stream, json_response, text_response
from mvllm.httpd import Server as HttpServer
from mvllm_sim.engine import Engine, SimRequest
from mvllm_sim.faults import CRASH_EXIT_STATUS, HEADER, FaultConfig, FaultPlan, RequestFault, error_for
from mvllm_sim.metrics import Metrics
from mvllm_sim.profiles import StepModel
from mvllm_sim.protocol import (
    ApiError,
    Job,
    logprobs_block,
    new_id,
    parse_chat,
    parse_completion,
    response_body,
    usage,
    words_as_tokens,
)
from mvllm_sim.runner import Runner
from mvllm_sim.text import LengthModel, Output, answer_so_far, detokenize, generate, sample_key, token_ids

log = logging.getLogger(__name__)
VLLM_VERSION = "0.32.0"


@dataclass(frozen=True)
class SimConfig:
    model: str
    served_model_name: str
    step_model: StepModel
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    kv_tokens: int
    time_scale: float = 1.0
    lengths: LengthModel = field(default_factory=LengthModel)
    faults: FaultConfig = field(default_factory=FaultConfig)
    api_key: str | None = None


@dataclass
class _Pending:
    """The requests of one HTTP call, and what wakes its handler."""

    job: Job
    requests: list[SimRequest]
    outputs: list[list[Output]]
    event: asyncio.Event = field(default_factory=asyncio.Event)


class SimServer:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engine = Engine(config.step_model, config.max_num_seqs, config.max_num_batched_tokens, config.kv_tokens)
        self.faults = FaultPlan(config.faults)
        self._frozen: tuple[int, int] | None = None  # running and waiting when the engine hung
        self.runner = Runner(
            self.engine, config.time_scale, config.faults.crash_at_s, hung=lambda: self.faults.engine_hung
        )
        self.metrics = Metrics(config.served_model_name)
        self.started = time.monotonic()
        self._pending: dict[int, _Pending] = {}
        self._requests = itertools.count()  # numbers unseeded requests: each draws its own output
        self._http: HttpServer | None = None
        self._engine_task: asyncio.Task[None] | None = None
        self.engine.on_finish = self._on_finish
        self.engine.on_progress = self._on_progress

    # --- serving --------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Run the engine loop and listen; returns the address bound (port 0 picks a free one)."""
        self._engine_task = asyncio.create_task(self.runner.run())
        self._engine_task.add_done_callback(_engine_stopped)
        routes = {
            ("GET", "/health"): self.health,
            ("GET", "/v1/models"): self.models,
            ("GET", "/metrics"): self.metrics_endpoint,
            ("GET", "/version"): self.version,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/detokenize"): self.detokenize,
        }
        self._http = HttpServer({route: self._guarded(handler) for route, handler in routes.items()})
        return await self._http.start(host, port)

    def _freeze(self) -> None:
        """The engine stops: its gauges stay as they were (vLLM's engine publishes them each step)."""
        if self._frozen is None:
            self._frozen = (self.engine.num_running, self.engine.num_waiting)

    def hang(self) -> None:
        """The engine stops stepping, for good, from now (SIGUSR1; faults.py)."""
        log.warning("engine hung on request (SIGUSR1): nothing will be stepped again")
        self._freeze()
        self.faults.hung_by_signal = True
        self.runner.wake()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._engine_task is not None:
            self._engine_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._engine_task

    def _guarded(self, handler: Handler) -> Handler:
        """The API key check on /v1/*, and vLLM's error envelope for an ApiError."""

        async def guarded(request: Request) -> Response:
            key = self.config.api_key
            if key and request.path.startswith("/v1/") and request.headers.get("authorization") != f"Bearer {key}":
                return json_response({"error": "Unauthorized"}, status=401)
            try:
                return await handler(request)
            except ApiError as exc:
                return json_response(exc.body(), status=exc.status)

        return guarded

    def _starting(self) -> bool:
        faults = self.config.faults
        return faults.startup_mode == "health-503" and time.monotonic() - self.started < faults.startup_delay_s

    # --- small endpoints ------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return Response(status=503 if self._starting() else 200)

    async def version(self, request: Request) -> Response:
        return json_response({"version": VLLM_VERSION})

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.config.served_model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.config.model,
            "parent": None,
            "max_model_len": self.config.max_model_len,
        }
        return json_response({"object": "list", "data": [card]})

    async def detokenize(self, request: Request) -> Response:
        """vLLM's /detokenize: {"model", "tokens"} -> {"prompt": text}."""
        body = _json_body(request)
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ApiError(400, "tokens must be a list of token ids", param="tokens")
        return json_response({"prompt": detokenize(ids)})

    async def metrics_endpoint(self, request: Request) -> Response:
        return text_response(self.metrics.render(self.engine, frozen=self._frozen))

    # --- generation -----------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        if self._starting():
            raise ApiError(503, "the server is starting", "ServiceUnavailableError")
        fault = self.faults.for_request(request.headers.get(HEADER.lower()))
        if self.faults.engine_hung:
            self._freeze()
        if fault.crash:
            log.error("injected crash after %d requests", self.faults.requests_seen - 1)
            os._exit(CRASH_EXIT_STATUS)
        if fault.status is not None:
            raise error_for(fault.status)
        job = await self._parse(request, chat)
        self.runner.wake()  # a hang-after fault may have just engaged; a new request also wakes it
        if fault.hang:
            await asyncio.Event().wait()  # accepted, never answered; a disconnect cancels this handler
        pending = self._submit(job)
        try:
            if job.sampling.stream:
                return await self._stream(request, pending, fault)
            await self._wait_all(pending)
        except (asyncio.CancelledError, ConnectionError):  # the client went away
            self._abort(pending)
            raise
        finally:
            for req in pending.requests:
                self._pending.pop(req.id, None)
        if fault.drop_after_chunks is not None:
            request.cut()  # the answer is lost; the engine had finished it
        outputs = [o for per_prompt in pending.outputs for o in per_prompt]
        return json_response(response_body(job, outputs))

    async def _parse(self, request: Request, chat: bool) -> Job:
        parse = parse_chat if chat else parse_completion
        job = parse(_json_body(request), self.config.served_model_name, self.config.max_model_len)
        if job.sampling.n > self.config.max_num_seqs:
            raise ApiError(400, f"n must be at most max_num_seqs ({self.config.max_num_seqs})", param="n")
        return job

    def _submit(self, job: Job) -> _Pending:
        s = self.config
        pending = _Pending(job, [], [])
        for prompt, ids in zip(job.prompts, job.prompt_ids, strict=True):
            room = s.max_model_len - len(ids)
            cap = min(job.sampling.max_tokens or room, room)
            request = next(self._requests)
            keys = [sample_key(prompt, i, job.sampling.seed, request) for i in range(job.sampling.n)]
            made = answer_so_far(ids)
            sampling = job.sampling
            outputs = [generate(k, s.lengths, cap, sampling.ignore_eos, sampling.stop, made) for k in keys]
            req = SimRequest(
                prompt_ids=ids,
                targets=[max(1, len(o.words)) for o in outputs],
                stream=sampling.stream,
                stream_interval=sampling.stream_interval,
            )
            pending.requests.append(req)
            pending.outputs.append(outputs)
            self.runner.submit(req)
            self._pending[req.id] = pending
        return pending

    async def _wait_all(self, pending: _Pending) -> None:
        while any(r.state != "finished" for r in pending.requests):
            pending.event.clear()
            await pending.event.wait()

    def _abort(self, pending: _Pending) -> None:
        for req in pending.requests:
            if req.state in ("waiting", "running"):
                self.engine.abort(req)
                self.metrics.finished["abort"] += req.n

    def _on_finish(self, req: SimRequest) -> None:
        pending = self._pending.get(req.id)
        if req.finished_at is not None:
            self.metrics.e2e_latency.observe(req.finished_at - req.arrival)
        if req.first_token_at is not None:
            self.metrics.ttft.observe(req.first_token_at - req.arrival)
        if req.scheduled_at is not None:
            self.metrics.queue_time.observe(req.scheduled_at - req.arrival)
        if pending is not None:
            index = pending.requests.index(req)
            for out in pending.outputs[index]:
                self.metrics.finished[out.finish_reason] += 1
            pending.event.set()

    def _on_progress(self, req: SimRequest) -> None:
        pending = self._pending.get(req.id)
        if pending is not None:
            pending.event.set()

    # --- streaming ------------------------------------------------------------------------------

    async def _stream(self, request: Request, pending: _Pending, fault: RequestFault) -> Response:
        job = pending.job
        response = await request.stream({"content-type": "text/event-stream", "cache-control": "no-cache"})
        stream = _SseWriter(response, job, new_id(job.chat), fault.drop_after_chunks)
        progress = [[_ChoiceProgress() for _ in range(job.sampling.n)] for _ in pending.requests]
        while True:
            pending.event.clear()
            for r, req in enumerate(pending.requests):
                for i, out in enumerate(pending.outputs[r]):
                    await self._emit(stream, req, i, index=r * job.sampling.n + i, out=out, progress=progress[r][i])
            if stream.dropped:
                self._abort(pending)  # as vLLM does when its client goes away
                request.cut()
                return response
            if all(r.state == "finished" for r in pending.requests):
                break
            await pending.event.wait()
        if job.sampling.include_usage:
            completion = sum(len(o.words) for per in pending.outputs for o in per)
            await stream.usage(usage(job.prompt_tokens, completion))
        await stream.done()
        return response

    async def _emit(
        self, stream: _SseWriter, req: SimRequest, i: int, *, index: int, out: Output, progress: _ChoiceProgress
    ) -> None:
        """Send what choice `i` of `req` generated since the last chunk, and its finish reason once done."""
        if progress.closed:
            return
        done = req.state == "finished" or (req.state == "running" and req.choice_done[i])
        have = len(out.words) if done else min(len(out.words), self.engine.generated_now(req, i))
        fewer = progress.sent > 0 and have - progress.sent < req.stream_interval  # after the first chunk
        if not done and (have == progress.sent or fewer):
            return  # nothing new, or less than the stream interval
        tokens = words_as_tokens(out)[progress.sent : have]
        prompt = req.prompt_ids if progress.sent == 0 else None
        await stream.choice(index, tokens, out.finish_reason if done else None, prompt, progress.offset)
        progress.sent, progress.offset, progress.closed = have, progress.offset + sum(map(len, tokens)), done


@dataclass
class _ChoiceProgress:
    sent: int = 0  # tokens sent
    offset: int = 0  # characters sent (text_offset of the next token)
    closed: bool = False  # the finish chunk went out


def _json_body(request: Request) -> Any:
    try:
        return json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as exc:
        # vLLM answers a body that is not JSON through its request validation: type "Bad Request".
        raise ApiError(400, f"1 validation error: JSON decode error: {exc}", "Bad Request", "body") from None


def _engine_stopped(task: asyncio.Task[None]) -> None:
    """The engine loop ends only on shutdown; if it fails, the server must not go on answering /health."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the engine loop failed", exc_info=task.exception())
        os._exit(1)


class _SseWriter:
    def __init__(self, response: Stream, job: Job, ident: str, drop_after: int | None) -> None:
        self._response, self._job, self._id = response, job, ident
        self._created = int(time.time())
        self._chunks = 0
        self._drop_after = drop_after
        self.dropped = False
        self._prompt_sent = False

    async def _send(self, payload: dict[str, Any]) -> None:
        if self.dropped:
            return
        if self._drop_after is not None and self._chunks >= self._drop_after:
            self.dropped = True
            return
        self._chunks += 1
        await self._response.write(f"data: {json.dumps(payload)}\n\n".encode())

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self._job.chat else "text_completion"
        return {
            "id": self._id,
            "object": kind,
            "created": self._created,
            "model": self._job.model,
            "choices": choices,
        }

    async def choice(
        self, index: int, tokens: Sequence[str], reason: str | None, prompt: Sequence[int] | None, offset: int
    ) -> None:
        """A chunk of one choice; `prompt` (the prompt's token ids) on the choice's first chunk."""
        text = "".join(tokens)
        sampling = self._job.sampling
        lp = (
            logprobs_block(self._job.chat, tokens, sampling.logprobs, offset)
            if sampling.logprobs is not None and tokens
            else None
        )
        ids = token_ids(text) if sampling.return_token_ids else None
        first = prompt is not None
        if self._job.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            body = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason, "token_ids": ids}
        else:
            body = {
                "index": index,
                "text": text,
                "logprobs": lp,
                "finish_reason": reason,
                "stop_reason": None,
                "prompt_token_ids": list(prompt) if prompt is not None and sampling.return_token_ids else None,
                "token_ids": ids,
            }
        chunk = self._envelope([body])
        if self._job.chat and sampling.return_token_ids and not self._prompt_sent:
            chunk["prompt_token_ids"] = list(prompt or ())  # vLLM: on the stream's first chunk
            self._prompt_sent = True
        await self._send(chunk)

    async def usage(self, numbers: dict[str, Any]) -> None:
        await self._send(dict(self._envelope([]), usage=numbers))

    async def done(self) -> None:
        if not self.dropped:
            await self._response.write(b"data: [DONE]\n\n")
