"""The HTTP side: vLLM's OpenAI-compatible endpoints over the simulated engine (on mvllm.httpd).

GET /health, /v1/models, /metrics, /version; POST /v1/completions, /v1/chat/completions (with SSE
streaming), /detokenize; with VLLM_SERVER_DEV_MODE=1, vLLM's development routes (devroutes.py: pause,
sleep, weights reload). A client that disconnects has its request aborted in the engine, as vLLM does.
A streamed choice goes out as vLLM 0.32 sends it: its first token at once, then a chunk per
`stream_interval` tokens (the request's; 1 by default), its last chunk when it ends; with
`return_token_ids`, each chunk holds its tokens' ids and the first the prompt's. A request that a
pause in abort mode ends gets finish_reason "abort" with the tokens it had (a streamed choice that had
none gets no chunk, as from vLLM).

Each choice's words are drawn when its request arrives; the words a client gets are those as the
weights that made each token write them (weights.Provenance), so a reload mid-answer shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from mvllm.httpd import Handler, Request, Response, json_response, text_response
from mvllm.httpd import Server as HttpServer
from mvllm_sim.control import Control
from mvllm_sim.devroutes import dev_routes
from mvllm_sim.engine import Engine, SimRequest
from mvllm_sim.faults import CRASH_EXIT_STATUS, HEADER, FaultConfig, FaultPlan, RequestFault, error_for
from mvllm_sim.metrics import Metrics
from mvllm_sim.profiles import StepModel
from mvllm_sim.protocol import (
    ApiError,
    Job,
    new_id,
    parse_chat,
    parse_completion,
    response_body,
    usage,
    words_as_tokens,
)
from mvllm_sim.runner import Runner
from mvllm_sim.sse import SseWriter
from mvllm_sim.text import LengthModel, Output, answer_so_far, detokenize, generate, sample_key
from mvllm_sim.weights import Provenance, Weights

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
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE: the development routes are served
    reload_s: float = 0.0  # simulated seconds a weights reload takes
    fingerprint: str | None = None  # of the weights at --model, when that is a checkpoint


@dataclass
class _Pending:
    """The requests of one HTTP call, and what wakes its handler."""

    job: Job
    requests: list[SimRequest]
    outputs: list[list[Output]]
    provenance: list[list[Provenance]]  # per request, per choice: which weights made which token
    event: asyncio.Event = field(default_factory=asyncio.Event)
    flush: bool = False  # streamed: send every token made, whatever the stream interval
    written: asyncio.Event = field(default_factory=asyncio.Event)  # all made so far is out (see flush)


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
        weights = Weights(config.model, config.fingerprint)
        self.control = Control(
            self.engine, self.runner, self, weights=weights, reload_s=config.reload_s, workers=config.step_model.tp,
            fail_reloads=config.faults.fail_reloads,
        )  # fmt: skip
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
        routes: dict[tuple[str, str], Handler] = {
            ("GET", "/health"): self.health,
            ("GET", "/v1/models"): self.models,
            ("GET", "/metrics"): self.metrics_endpoint,
            ("GET", "/version"): self.version,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/detokenize"): self.detokenize,
        }
        if self.config.dev_mode:
            routes.update(dev_routes(self.control))
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
        frozen = self._frozen or self.control.gauges
        clock = self.runner.now_sim()
        return text_response(self.metrics.render(self.engine, clock, frozen, self.control.sleep_state))

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
            pending.written.set()  # the answer goes out as this handler returns, before a flush resumes
        if fault.drop_after_chunks is not None:
            request.cut()  # the answer is lost; the engine had finished it
        outputs = [
            p.output(o)
            for outs, provs in zip(pending.outputs, pending.provenance, strict=True)
            for o, p in zip(outs, provs, strict=True)
        ]
        return json_response(response_body(job, outputs))

    async def _parse(self, request: Request, chat: bool) -> Job:
        parse = parse_chat if chat else parse_completion
        job = parse(_json_body(request), self.config.served_model_name, self.config.max_model_len)
        if job.sampling.n > self.config.max_num_seqs:
            raise ApiError(400, f"n must be at most max_num_seqs ({self.config.max_num_seqs})", param="n")
        return job

    def _submit(self, job: Job) -> _Pending:
        s = self.config
        pending = _Pending(job, [], [], [])
        tag = self.control.weights.tag
        for prompt, ids in zip(job.prompts, job.prompt_ids, strict=True):
            room = s.max_model_len - len(ids)
            cap = min(job.sampling.max_tokens or room, room)
            request = next(self._requests)
            keys = [sample_key(prompt, i, job.sampling.seed, request) for i in range(job.sampling.n)]
            made = answer_so_far(ids)
            sampling = job.sampling
            outputs = [generate(k, s.lengths, cap, sampling.ignore_eos, sampling.stop, made, tag) for k in keys]
            req = SimRequest(
                prompt_ids=ids,
                targets=[max(1, len(o.words)) for o in outputs],
                stream=sampling.stream,
                stream_interval=sampling.stream_interval,
            )
            pending.requests.append(req)
            pending.outputs.append(outputs)
            pending.provenance.append([Provenance([(0, tag)]) for _ in outputs])
            self.runner.submit(req)
            self._pending[req.id] = pending
        return pending

    async def _wait_all(self, pending: _Pending) -> None:
        while not all(_ended(r) for r in pending.requests):
            pending.event.clear()
            await pending.event.wait()

    def _abort(self, pending: _Pending) -> None:
        for req in pending.requests:
            if req.state in ("waiting", "running"):
                self.engine.abort(req)
                self.metrics.finished["abort"] += req.n
        self.control.request_ended()

    def _on_finish(self, req: SimRequest) -> None:
        self.control.request_ended()
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

    # --- what the engine's controls do to the requests in flight (control.Clients) --------------

    def _in_flight(self) -> list[_Pending]:
        return list({id(p): p for p in self._pending.values()}.values())

    def abort_all(self) -> None:
        """End every request in flight with finish_reason "abort" and the tokens each choice made (a
        choice that had ended keeps its own ending), as vLLM's pause in abort mode ends them."""
        for pending in self._in_flight():
            for r, req in enumerate(pending.requests):
                if req.state not in ("waiting", "running"):
                    continue
                made = [self.engine.generated_now(req, i) for i in range(req.n)]
                cut = [not done for done in req.choice_done]
                self.engine.abort(req)
                pending.outputs[r] = [
                    replace(out, words=out.words[: made[i]], finish_reason="abort") if cut[i] else out
                    for i, out in enumerate(pending.outputs[r])
                ]
                self.metrics.finished["abort"] += sum(cut)
            pending.event.set()

    async def flush(self) -> None:
        """Every token made so far goes out on its stream, whatever the stream interval, and every
        request that ended has its answer written; returns once all is handed to the connections."""
        waits = []
        for pending in self._in_flight():
            if pending.job.sampling.stream:
                pending.flush = True
                pending.written.clear()
                pending.event.set()
            elif not all(_ended(r) for r in pending.requests):
                continue  # nothing to write yet
            waits.append(pending.written.wait())
        await asyncio.gather(*waits)

    def switch_weights(self, tag: int | None) -> None:
        """The tokens each choice in flight makes from now on are made by weights of `tag`."""
        for pending in self._in_flight():
            for req, provenance in zip(pending.requests, pending.provenance, strict=True):
                if req.state in ("waiting", "running"):
                    for i, choice in enumerate(provenance):
                        choice.switch(self.engine.generated_now(req, i), tag)

    # --- streaming ------------------------------------------------------------------------------

    async def _stream(self, request: Request, pending: _Pending, fault: RequestFault) -> Response:
        job = pending.job
        response = await request.stream({"content-type": "text/event-stream", "cache-control": "no-cache"})
        stream = SseWriter(response, job, new_id(job.chat), fault.drop_after_chunks)
        progress = [[_ChoiceProgress() for _ in range(job.sampling.n)] for _ in pending.requests]
        try:
            while True:
                pending.event.clear()
                force, pending.flush = pending.flush, False
                for r, req in enumerate(pending.requests):
                    for i, out in enumerate(pending.outputs[r]):
                        index, provenance = r * job.sampling.n + i, pending.provenance[r][i]
                        await self._emit(stream, req, i, index=index, out=out, provenance=provenance,
                                         progress=progress[r][i], force=force)  # fmt: skip
                pending.written.set()
                if stream.dropped:
                    self._abort(pending)  # as vLLM does when its client goes away
                    request.cut()
                    return response
                if all(_ended(r) for r in pending.requests):
                    break
                await pending.event.wait()
        finally:
            pending.written.set()  # a flush does not wait for a stream that is gone
        if job.sampling.include_usage:
            completion = sum(len(o.words) for per in pending.outputs for o in per)
            await stream.usage(usage(job.prompt_tokens, completion))
        await stream.done()
        return response

    async def _emit(
        self,
        stream: SseWriter,
        req: SimRequest,
        i: int,
        *,
        index: int,
        out: Output,
        provenance: Provenance,
        progress: _ChoiceProgress,
        force: bool,
    ) -> None:
        """Send what choice `i` of `req` generated since the last chunk (all of it if `force`: the
        stream interval is not waited for), and its finish reason once done."""
        if progress.closed:
            return
        done = _ended(req) or (req.state == "running" and req.choice_done[i])
        have = len(out.words) if done else min(len(out.words), self.engine.generated_now(req, i))
        fewer = progress.sent > 0 and have - progress.sent < req.stream_interval and not force
        if not done and (have == progress.sent or fewer):
            return  # nothing new, or less than the stream interval
        if have == 0 and out.finish_reason == "abort":
            progress.closed = True  # aborted before its first token: vLLM sends nothing for it
            return
        words = provenance.words(out.words, progress.sent, have)
        tokens = words_as_tokens(words, out.continued, progress.sent)
        prompt = req.prompt_ids if progress.sent == 0 else None
        await stream.choice(index, tokens, out.finish_reason if done else None, prompt, progress.offset)
        progress.sent, progress.offset, progress.closed = have, progress.offset + sum(map(len, tokens)), done


@dataclass
class _ChoiceProgress:
    sent: int = 0  # tokens sent
    offset: int = 0  # characters sent (text_offset of the next token)
    closed: bool = False  # the finish chunk went out


def _ended(req: SimRequest) -> bool:
    return req.state in ("finished", "aborted")


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
