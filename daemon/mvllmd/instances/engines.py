"""Engines: how each kind (vLLM, mvllm-sim) is started. The interpreter, the argv and the environment
that go into an instance's spec, its batch limit, and where its API key travels.

The API key goes to the engine as VLLM_API_KEY (both engines read it), never in argv:
/proc/PID/cmdline is world-readable. mvllmd reads it back from the spec to probe the engine.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mvllmd.config import Config, EngineSettings
from mvllmd.errors import InvalidRequest
from mvllmd.instances.placement import device_ref
from mvllmd.instances.request import DEV_MODE_ENV, LaunchRequest
from mvllmd.instances.spec import EngineKind, InstanceSpec, log_path
from mvllmd.inventory import Device, DeviceKind

ENGINE_MODULES = {EngineKind.VLLM: "vllm.entrypoints.openai.api_server", EngineKind.SIM: "mvllm_sim"}
DEFAULT_MAX_NUM_SEQS = {EngineKind.VLLM: 256, EngineKind.SIM: 1024}  # each engine's own default
API_KEY_ENV = "VLLM_API_KEY"


def engine_python(settings: EngineSettings, engine: EngineKind) -> str:
    """The interpreter that runs this engine: mvllmd's own for the simulator, the configured one for vLLM."""
    if engine is EngineKind.SIM:
        return sys.executable
    python = settings.vllm_python
    if python is None:
        raise InvalidRequest("no vLLM interpreter is configured: set [engine.vllm] python or --vllm-python")
    if not os.access(python, os.X_OK) or not python.is_file():
        raise InvalidRequest(f"the vLLM interpreter {python} does not exist or cannot run; set [engine.vllm] python")
    return str(python)


def instance_spec(
    config: Config, request: LaunchRequest, python: str, *, name: str, port: int, devices: tuple[Device, ...]
) -> InstanceSpec:
    """The spec of one instance of the request, on these devices and this port."""
    return InstanceSpec(
        name=name,
        engine=request.engine,
        model=request.model,
        served_model_name=request.model,
        host=request.host,
        port=port,
        tensor_parallel_size=request.tensor_parallel_size,
        devices=tuple(device_ref(d) for d in devices),
        argv=tuple(engine_argv(request, python, port)),
        env=engine_env(request, devices, config.engine),
        log_path=str(log_path(config.daemon.state_dir, name)),
        max_num_seqs=request.max_num_seqs or max_num_seqs(request.engine, request.engine_args),
        hf_token_file=str(config.engine.hf_token_file or ""),
        launched_at=time.time(),
        weight_updates=bool(request.weight_updates),
        weight_version=first_version(request.model) if request.weight_updates else "",
        trial=request.trial,
    )


def first_version(model: str) -> str:
    """The version of the weights an instance is launched with: the model path's last part, as an
    update's version defaults to its path's (weights/)."""
    return Path(model.rstrip("/")).name or model


def engine_argv(request: LaunchRequest, python: str, port: int) -> list[str]:
    argv = [python, "-m", ENGINE_MODULES[request.engine], "--model", request.model, "--host", request.host,
            "--port", str(port), "--tensor-parallel-size", str(request.tensor_parallel_size),
            "--served-model-name", request.model]  # fmt: skip
    if request.max_num_seqs:
        argv += ["--max-num-seqs", str(request.max_num_seqs)]
    return argv + list(request.engine_args)


def engine_env(request: LaunchRequest, devices: tuple[Device, ...], settings: EngineSettings) -> dict[str, str]:
    """The request's environment, the API key, the devices the engine may see, and HF_HOME."""
    env = dict(request.env)
    if request.api_key:
        env[API_KEY_ENV] = request.api_key  # not in argv: /proc/PID/cmdline is world-readable
    if devices[0].kind is DeviceKind.GPU:
        indexes = ",".join(str(d.index) for d in devices)
        env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=indexes)  # NVML's numbering
    if request.weight_updates:
        env[DEV_MODE_ENV] = "1"  # vLLM's development routes: /pause, /collective_rpc, /sleep, ...
    if settings.hf_home:
        env.setdefault("HF_HOME", str(settings.hf_home))
    return env


def max_num_seqs(engine: EngineKind, engine_args: tuple[str, ...]) -> int:
    """--max-num-seqs among the engine arguments, else the engine's default."""
    for i, arg in enumerate(engine_args):
        if arg == "--max-num-seqs" and i + 1 < len(engine_args) and engine_args[i + 1].isdigit():
            return int(engine_args[i + 1])
        if arg.startswith("--max-num-seqs=") and arg.split("=", 1)[1].isdigit():
            return int(arg.split("=", 1)[1])
    return DEFAULT_MAX_NUM_SEQS[engine]


def api_key(spec: InstanceSpec) -> str:
    """The key an instance's engine was given (empty when none), to probe it and to send it jobs."""
    return spec.env.get(API_KEY_ENV, "")
