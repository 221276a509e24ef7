"""Timing profiles: data in profiles.toml, resolved for a tensor-parallel size into a StepModel.

A profile gives its KV cache's capacity either as `kv_tokens` at TP1 plus `gpu_kv_tokens` for each
further GPU, or as the memory vLLM sizes it from (see `kv_capacity` and profiles.toml's header).
"""

from __future__ import annotations

import importlib.resources
import tomllib
from dataclasses import dataclass
from typing import Any

SUPPORTED_TP = (1, 2, 4, 8)
BLOCK_TOKENS = 16  # vLLM's KV block: the cache holds whole blocks


class ProfileError(ValueError):
    """An unknown profile or an unsupported tensor-parallel size."""


@dataclass(frozen=True)
class StepModel:
    """The cost of one engine step, in simulated seconds, for one profile at one TP size."""

    name: str
    tp: int
    overhead_s: float
    weight_read_s: float
    per_token_s: float
    per_ctx_token_s: float
    per_seq_s: float
    kv_tokens: int  # 0: no room for a KV cache at this TP size (the engine cannot start)
    kv_bytes_per_token: int  # every layer's K and V of one token, over the whole TP group
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    allreduce_fixed_s: float  # per step, whatever its size
    allreduce_per_token_s: float  # per token in the step
    speed: float = 1.0

    def step_time(self, tokens: int, context_sum: int, batch: int) -> float:
        compute = max(self.weight_read_s, self.per_token_s * tokens)
        total = self.overhead_s + compute + self.per_ctx_token_s * context_sum + self.per_seq_s * batch
        if self.tp > 1:
            total += self.allreduce_fixed_s + self.allreduce_per_token_s * tokens
        return total / self.speed


def load_profiles() -> dict[str, dict[str, Any]]:
    text = importlib.resources.files("mvllm_sim").joinpath("profiles.toml").read_text()
    return tomllib.loads(text)


def _profile(name: str) -> dict[str, Any]:
    profiles = load_profiles()
    if name not in profiles:
        raise ProfileError(f"unknown profile {name!r}; known: {', '.join(sorted(profiles))}")
    return profiles[name]


def reload_seconds(name: str) -> float:
    """How long reloading the profile's weights from disk takes, in simulated seconds (at any TP size:
    the read of the checkpoint, which the ranks share, dominates)."""
    return float(_profile(name)["reload_s"])


def step_model(name: str, tp: int = 1, speed: float = 1.0, gpu_memory_utilization: float | None = None) -> StepModel:
    """The profile's timing at `tp`; `gpu_memory_utilization` (vLLM's flag) in place of the profile's own
    share, where the profile models its memory (memory_modelled)."""
    p = _profile(name)
    if tp not in SUPPORTED_TP:
        raise ProfileError(f"--tensor-parallel-size {tp} is not modelled; use one of {SUPPORTED_TP}")
    fixed = per_token = 0.0
    if tp > 1:
        allreduces = 2 * p["layers"]  # after attention and after the MLP, in every layer
        fixed = allreduces * p["allreduce_latency_s"][str(tp)]
        bytes_per_token = 2 * (tp - 1) / tp * p["hidden"] * 2  # ring all-reduce of bf16 activations
        per_token = allreduces * bytes_per_token / p["allreduce_bus_bytes_per_s"]
    return StepModel(
        name=name,
        tp=tp,
        overhead_s=p["overhead_s"],
        weight_read_s=p["weight_read_s"] / tp,
        per_token_s=p["per_token_s"] / tp,
        per_ctx_token_s=p["per_ctx_token_s"] / tp,
        per_seq_s=p["per_seq_s"],
        kv_tokens=kv_capacity(p, tp, gpu_memory_utilization),
        kv_bytes_per_token=p["kv_bytes_per_token"],
        max_num_seqs=p["max_num_seqs"],
        max_num_batched_tokens=p["max_num_batched_tokens"],
        max_model_len=p["max_model_len"],
        allreduce_fixed_s=fixed,
        allreduce_per_token_s=per_token,
        speed=speed,
    )


def memory_modelled(name: str) -> bool:
    """Whether the profile works its KV cache out from its GPUs' memory (else it states it in tokens)."""
    return "gpu_memory_bytes" in _profile(name)


def kv_capacity(p: dict[str, Any], tp: int, utilization: float | None = None) -> int:
    """The KV cache's tokens at `tp` GPUs: the profile's own figures, or what its memory leaves once
    each GPU holds its share of the weights and its activations (0 when nothing is left), with the
    share of memory the engine may take (`utilization`, else the profile's: vLLM's default)."""
    if "gpu_memory_bytes" not in p:
        return int(p["kv_tokens"] + (tp - 1) * p["gpu_kv_tokens"])
    usable = p["gpu_memory_bytes"] * (p["gpu_memory_utilization"] if utilization is None else utilization)
    free = usable - p["weights_bytes"] / tp - p["activation_bytes"][str(tp)]
    tokens = int(max(0.0, free) * tp / p["kv_bytes_per_token"])
    return tokens - tokens % BLOCK_TOKENS
