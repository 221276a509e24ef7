"""Timing profiles: data in profiles.toml, resolved for a tensor-parallel size into a StepModel."""

from __future__ import annotations

import importlib.resources
import tomllib
from dataclasses import dataclass
from typing import Any

SUPPORTED_TP = (1, 2, 4, 8)


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
    kv_tokens: int
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


def step_model(name: str, tp: int = 1, speed: float = 1.0) -> StepModel:
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
        kv_tokens=p["kv_tokens"] + (tp - 1) * p["gpu_kv_tokens"],
        max_num_seqs=p["max_num_seqs"],
        max_num_batched_tokens=p["max_num_batched_tokens"],
        max_model_len=p["max_model_len"],
        allreduce_fixed_s=fixed,
        allreduce_per_token_s=per_token,
        speed=speed,
    )
