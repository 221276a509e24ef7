"""Whether a split's devices can hold the model, estimated before anything starts.

The model's size comes from its local files (a model given as a path, or a hub name whose snapshot is
in the engines' HF_HOME cache, [engine] hf_home): the safetensors index's
`total_size`, else the safetensors files' sizes, else the parameters counted from config.json (a
decoder-only transformer: attention, a gated MLP or its experts, embeddings). The bytes are those vLLM
serves: an fp32 checkpoint runs as bf16 (vLLM's `--dtype auto`) unless `--dtype` says otherwise. A
model without these files here has no size: every split is then tried.

Each device may use its memory times vLLM's `--gpu-memory-utilization` (0.9 unless the engine
arguments say). A split whose TP puts more weights on a device than that does not fit, and is not
tried; one that leaves less than TIGHT_SHARE of it for the KV cache (and activations) is tight: the
estimate is unsure there, so it is tried, and its engine says whether it starts.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization
TIGHT_SHARE = 0.2  # of a device's usable memory: less than this left for the KV cache is tight
GB = 1e9
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8": 1, "fp8": 1}


class Fit(enum.StrEnum):
    FITS = "fits"
    TIGHT = "tight"
    DOES_NOT_FIT = "does not fit"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ModelSize:
    weights_bytes: int  # as vLLM serves them
    kv_bytes_per_token: int  # every layer's keys and values of one token; 0 when not known
    kv_heads: int  # a TP larger than this copies the KV heads instead of splitting them; 0: not known
    source: str  # where the size comes from, in words


@dataclass(frozen=True)
class Estimate:
    fit: Fit
    weights_bytes: int = 0
    per_device_bytes: int = 0
    usable_bytes: int = 0
    note: str = ""


def model_size(model: str, engine_args: tuple[str, ...] = (), hf_home: Path | None = None) -> ModelSize | None:
    """The size of a model given as a local path, or as a hub name found in the engines' HF_HOME cache;
    None for a model without its config there."""
    folder = Path(model) if Path(model).is_absolute() else _cached(model, hf_home)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    stored = DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), 2)
    served = _served_bytes(stored, engine_args)
    kv_bytes, kv_heads = _kv(config, served)
    files = _checkpoint_bytes(folder)
    if files is not None:
        quantized = "quantization_config" in config
        weights = files[0] if quantized or served == stored else files[0] * served // stored
        return ModelSize(weights, kv_bytes, kv_heads, files[1])
    params = _parameters(config)
    if params is None or "quantization_config" in config:
        return None
    return ModelSize(params * served, kv_bytes, kv_heads, "config.json")


def _cached(name: str, hf_home: Path | None) -> Path | None:
    """A hub model's snapshot in the HF_HOME cache (hub/models--ORG--NAME/snapshots/REV): the one
    refs/main names, else the newest."""
    if hf_home is None or name.count("/") != 1:
        return None
    repo = hf_home / "hub" / f"models--{name.replace('/', '--')}"
    try:
        main = repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
        if main.is_dir():
            return main
    except OSError:
        pass
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if repo.is_dir() else []
    return snapshots[-1] if snapshots else None


def utilization(engine_args: tuple[str, ...]) -> float:
    """vLLM's --gpu-memory-utilization from the engine arguments, else its default."""
    value = _flag(engine_args, "--gpu-memory-utilization")
    try:
        share = float(value) if value is not None else DEFAULT_UTILIZATION
    except ValueError:
        return DEFAULT_UTILIZATION
    return share if 0 < share <= 1 else DEFAULT_UTILIZATION


def estimate(size: ModelSize | None, tp: int, memory_bytes: int, share: float) -> Estimate:
    """How `tp` devices of `memory_bytes` each hold the model."""
    if size is None:
        return Estimate(Fit.UNKNOWN, note="the model's size is not known here (give its local path to size it)")
    per_device = math.ceil(size.weights_bytes / tp)
    if memory_bytes <= 0:
        return Estimate(Fit.UNKNOWN, size.weights_bytes, per_device, note="the devices' memory is not known")
    usable = int(memory_bytes * share)
    found = Estimate(Fit.FITS, size.weights_bytes, per_device, usable)
    words = f"{per_device / GB:.1f} GB of weights on each device, of {usable / GB:.1f} GB usable"
    if per_device > usable:
        return _with(found, Fit.DOES_NOT_FIT, f"{words}: they do not fit")
    left = usable - per_device
    kv = f" (about {_kv_tokens(size, tp, left):,} tokens)" if size.kv_bytes_per_token else ""
    fit = Fit.TIGHT if left < TIGHT_SHARE * usable else Fit.FITS
    return _with(found, fit, f"{words}: {left / GB:.1f} GB left for the KV cache and activations{kv}")


def smallest_tp(size: ModelSize, memory_bytes: int, share: float) -> int:
    """The smallest power-of-two TP whose devices hold the weights (it may exceed the devices there are)."""
    tp = 1
    while size.weights_bytes / tp > memory_bytes * share:
        tp *= 2
    return tp


def _with(found: Estimate, fit: Fit, note: str) -> Estimate:
    return Estimate(fit, found.weights_bytes, found.per_device_bytes, found.usable_bytes, note)


def _kv_tokens(size: ModelSize, tp: int, left: int) -> int:
    split = min(tp, size.kv_heads) if size.kv_heads else tp
    return int(left / (size.kv_bytes_per_token / split))


def _served_bytes(stored: int, engine_args: tuple[str, ...]) -> int:
    asked = _flag(engine_args, "--dtype")
    if asked and asked != "auto":
        return DTYPE_BYTES.get(asked, stored)
    return 2 if stored == 4 else stored  # vLLM's auto: an fp32 checkpoint runs in bf16


def _flag(args: tuple[str, ...], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return None


def _checkpoint_bytes(folder: Path) -> tuple[int, str] | None:
    index = folder / "model.safetensors.index.json"
    try:
        total = json.loads(index.read_text())["metadata"]["total_size"]
        if isinstance(total, int) and total > 0:
            return total, "the safetensors index"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    files = sorted(folder.glob("*.safetensors"))
    found = sum(f.stat().st_size for f in files)
    return (found, "the safetensors files") if found > 0 else None


def _kv(config: dict[str, Any], served: int) -> tuple[int, int]:
    try:
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0, 0
    return 2 * layers * kv_heads * head_dim * served, kv_heads


def _parameters(config: dict[str, Any]) -> int | None:
    """A decoder-only transformer's parameters, from its config; None when a field is missing."""
    try:
        hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        vocab, heads = int(config["vocab_size"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        intermediate = int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    if experts:
        expert_width = int(config.get("moe_intermediate_size") or intermediate)
        mlp = experts * 3 * hidden * expert_width + hidden * experts
    else:
        mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp + 2 * hidden) + embeddings + hidden
