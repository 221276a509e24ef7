"""What goes into an instance's spec: the engine's argv and environment, its batch limit, its API key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mvllmd.config import Config, EngineSettings, load_config
from mvllmd.errors import InvalidRequest
from mvllmd.instances.engines import api_key, engine_python, instance_spec, max_num_seqs
from mvllmd.instances.request import LaunchRequest
from mvllmd.instances.spec import EngineKind
from mvllmd.inventory import Device, DeviceKind


def config(tmp_path: Path, **overrides: object) -> Config:
    base = {"daemon.listen": [f"unix:{tmp_path}/s"], "daemon.state_dir": str(tmp_path / "state")}
    return load_config(None, {**base, **overrides}, {"HOME": str(tmp_path)}, 1000)


def test_a_vllm_spec(tmp_path: Path) -> None:
    request = LaunchRequest("org/m", engine_args=("--max-model-len", "512"), api_key="k", env={"A": "1"})
    gpus = (Device(DeviceKind.GPU, 2, "GPU-2", "H100"), Device(DeviceKind.GPU, 3, "GPU-3", "H100"))
    spec = instance_spec(
        config(tmp_path, **{"engine.hf_home": "/hf"}), request, "/venv/bin/python", name="m-0", port=8001, devices=gpus
    )
    assert spec.argv == ("/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "org/m",
                         "--host", "127.0.0.1", "--port", "8001", "--tensor-parallel-size", "1",
                         "--served-model-name", "org/m", "--max-model-len", "512")  # fmt: skip
    assert spec.env == {"A": "1", "VLLM_API_KEY": "k", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                        "CUDA_VISIBLE_DEVICES": "2,3", "HF_HOME": "/hf"}  # fmt: skip
    assert spec.devices == ("gpu:2", "gpu:3")
    assert spec.log_path == str(tmp_path / "state" / "instances" / "m-0.log")
    assert spec.max_num_seqs == 256
    assert api_key(spec) == "k"


def test_a_sim_spec_on_simulated_gpus(tmp_path: Path) -> None:
    request = LaunchRequest("m", engine=EngineKind.SIM, max_num_seqs=8, env={"HF_HOME": "/mine"})
    spec = instance_spec(config(tmp_path, **{"engine.hf_home": "/hf"}), request, sys.executable, name="m-0",
                         port=9000, devices=(Device(DeviceKind.SIM_GPU, 0, "sim-0", "sim"),))  # fmt: skip
    assert spec.argv[1:3] == ("-m", "mvllm_sim")
    assert spec.argv[-2:] == ("--max-num-seqs", "8")
    assert spec.env == {"HF_HOME": "/mine"}  # the request's own wins; no devices to name, no key
    assert spec.max_num_seqs == 8
    assert api_key(spec) == ""


def test_a_spec_with_weight_updates_and_then_new_weights(tmp_path: Path) -> None:
    request = LaunchRequest("/ckpt/step-0/", engine=EngineKind.SIM, weight_updates=True,
                            engine_args=("--model-len", "9"))  # fmt: skip
    spec = instance_spec(config(tmp_path), request, sys.executable, name="m-0", port=9000,
                         devices=(Device(DeviceKind.SIM_GPU, 0, "sim-0", "sim"),))  # fmt: skip
    assert spec.env == {"VLLM_SERVER_DEV_MODE": "1"}  # the development routes, on loopback only
    assert (spec.weight_updates, spec.weights_path, spec.weight_version) == (True, "/ckpt/step-0/", "step-0")
    moved = spec.with_weights("/ckpt/step-1", "v1")
    assert moved.argv[moved.argv.index("--model") + 1] == "/ckpt/step-1"  # the next start loads it
    assert moved.argv[moved.argv.index("--served-model-name") + 1] == "/ckpt/step-0/"  # clients' name stays
    assert (moved.weights_path, moved.weight_version) == ("/ckpt/step-1", "v1")
    plain = instance_spec(config(tmp_path), LaunchRequest("m", engine=EngineKind.SIM), sys.executable, name="p-0",
                          port=9001, devices=(Device(DeviceKind.SIM_GPU, 1, "sim-1", "sim"),))  # fmt: skip
    assert (plain.weight_updates, plain.weight_version, plain.env) == (False, "", {})


@pytest.mark.parametrize(
    ("engine", "args", "expected"),
    [
        (EngineKind.VLLM, (), 256),
        (EngineKind.SIM, (), 1024),
        (EngineKind.VLLM, ("--max-num-seqs", "64"), 64),
        (EngineKind.VLLM, ("--max-num-seqs=32",), 32),
        (EngineKind.VLLM, ("--max-num-seqs",), 256),
        (EngineKind.VLLM, ("--max-num-seqs", "many"), 256),
    ],
)
def test_max_num_seqs(engine: EngineKind, args: tuple[str, ...], expected: int) -> None:
    assert max_num_seqs(engine, args) == expected


def test_the_engine_interpreter(tmp_path: Path) -> None:
    assert engine_python(EngineSettings(None, None, None), EngineKind.SIM) == sys.executable
    with pytest.raises(InvalidRequest, match="no vLLM interpreter is configured"):
        engine_python(EngineSettings(None, None, None), EngineKind.VLLM)
    with pytest.raises(InvalidRequest, match="does not exist or cannot run"):
        engine_python(EngineSettings(tmp_path / "python", None, None), EngineKind.VLLM)
    assert engine_python(EngineSettings(Path(sys.executable), None, None), EngineKind.VLLM) == sys.executable
