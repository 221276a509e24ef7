"""A streamed completion as vLLM 0.32 sends it: server-sent events of chunks in its envelopes
(`text_completion` or `chat.completion.chunk`), an optional usage event, then `data: [DONE]`; and the
drop-after-K-chunks fault (faults.py), which cuts the stream after K events."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from mvllm.httpd import Stream
from mvllm_sim.protocol import Job, logprobs_block
from mvllm_sim.text import token_ids


class SseWriter:
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
