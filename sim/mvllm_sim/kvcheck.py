"""The KV cache's start-up checks, as vLLM's engine makes them once it has measured its memory, in vLLM
0.32's words (vllm/v1/core/kv_cache_utils.py): no room for a KV cache at all; room for less than one
request of max_model_len; and `--max-model-len auto` (or -1), which takes the longest that fits.

vLLM states memory per GPU (per worker): each GPU of a TP group holds 1/TP of every token's KV.
"""

from __future__ import annotations

from mvllm_sim.profiles import BLOCK_TOKENS

AUTO = -1  # vLLM's --max-model-len -1 or auto
GIB = 1 << 30
DOCS = "See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."


class KvCacheError(ValueError):
    """The engine cannot start: its KV cache cannot hold what it must. The message is vLLM's."""


def checked_max_model_len(max_model_len: int, kv_tokens: int, kv_bytes_per_token: int, tp: int, derived: int) -> int:
    """The context length the engine runs with: `max_model_len` as asked (AUTO: the longest of at most
    `derived`, the model's own, that the KV cache holds). Raises KvCacheError as vLLM does."""
    if max_model_len == AUTO:
        if kv_tokens < BLOCK_TOKENS:
            raise KvCacheError("Cannot auto-fit max_model_len: not enough GPU memory available to serve even a "
                               "single token. Try increasing `gpu_memory_utilization`.")  # fmt: skip
        return min(derived, _whole_blocks(kv_tokens))
    if kv_tokens <= 0:
        raise KvCacheError(
            "No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the "
            "engine (this flag also controls CPU memory reservation on the CPU backend, despite its name). " + DOCS
        )
    blocks = _whole_blocks(max_model_len + BLOCK_TOKENS - 1)  # one request's blocks, the last one partly used
    if blocks > kv_tokens:
        needed, available = blocks * kv_bytes_per_token // tp, kv_tokens * kv_bytes_per_token // tp
        estimate = _whole_blocks(kv_tokens)
        estimated = f"the estimated maximum model length is {estimate}. " if estimate else ""
        raise KvCacheError(
            f"To serve at least one request with the model's max seq len ({max_model_len}), "
            f"({_gib(needed)} GiB KV cache is needed, which is larger than the available KV cache memory "
            f"({_gib(available)} GiB). "
            + (f"Based on the available memory, {estimated}" if estimated else "")
            + "Try increasing `gpu_memory_utilization` (which also controls CPU memory on the CPU backend) or "
            "decreasing `max_model_len` when initializing the engine. " + DOCS
        )
    return max_model_len


def _whole_blocks(tokens: int) -> int:
    return tokens - tokens % BLOCK_TOKENS


def _gib(n: int) -> str:
    return f"{round(n / GIB, 2)}"  # vLLM's format_gib
