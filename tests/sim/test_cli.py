"""mvllm-sim's command line: vLLM's arguments, its own, and clear refusals."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from mvllm_sim.cli import config_from, parser
from mvllm_sim.server import SimConfig

from simkit import MVLLM_SIM, SimProcess


def config(*args: str) -> SimConfig:
    return config_from(parser().parse_args(list(args)))


def test_vllm_arguments_set_the_engine() -> None:
    c = config("--model", "org/Model-7B", "--served-model-name", "m7", "-tp", "2", "--max-num-seqs", "64",
               "--max-num-batched-tokens", "2048", "--max-model-len", "4096")  # fmt: skip
    assert (c.model, c.served_model_name) == ("org/Model-7B", "m7")
    assert c.step_model.tp == 2
    assert (c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len) == (64, 2048, 4096)
    assert c.kv_tokens == c.step_model.kv_tokens


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-tp", "3"], "--tensor-parallel-size 3 is not modelled"),
        (["--profile", "tpu-9b"], "unknown profile 'tpu-9b'"),
        (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
        (["--error-rate", "1.5"], "--error-rate must be between 0 and 1"),
        (["--time-scale", "-1"], "--time-scale must be >= 0"),
        (["--max-model-len", "0"], "--max-model-len must be at least 1"),
        (["--max-model-len", "long"], "argument --max-model-len: invalid model_len value: 'long'"),
    ],
)
def test_refusals(args: list[str], message: str) -> None:
    done = subprocess.run([MVLLM_SIM, *args], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


ENGINE_FAILED = ("RuntimeError: Engine core initialization failed. See root cause above. "
                 "Failed core proc(s): {'EngineCore_DP0': 1}")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (  # 141.1 GB of weights on one 80 GB GPU
            ["--profile", "h100-70b"],
            "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
            "initializing the engine (this flag also controls CPU memory reservation on the CPU backend, despite "
            "its name). See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.",
        ),
        (  # 2,736 tokens of KV (0.42 GiB a GPU) cannot hold one request of the model's 131,072
            ["--profile", "h100-70b", "-tp", "2"],
            "ValueError: To serve at least one request with the model's max seq len (131072), (20.0 GiB KV cache is "
            "needed, which is larger than the available KV cache memory (0.42 GiB). Based on the available memory, "
            "the estimated maximum model length is 2736. Try increasing `gpu_memory_utilization`",
        ),
        (
            ["--profile", "h100-70b", "--max-model-len", "auto"],
            "ValueError: Cannot auto-fit max_model_len: not enough GPU memory available to serve even a single token.",
        ),
        (["--kv-tokens", "1000", "--max-model-len", "1001"], "max seq len (1001), (0.12 GiB KV cache is needed"),
    ],
)
def test_what_does_not_fit_refuses_to_start_as_vllm_does(args: list[str], message: str) -> None:
    """Exit status 1, vLLM's root cause and its engine-core failure on stderr, and nothing listened."""
    done = subprocess.run([MVLLM_SIM, *args], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert message in done.stderr
    assert done.stderr.splitlines()[-1] == ENGINE_FAILED
    assert "Traceback" not in done.stderr and "mvllm-sim serving" not in done.stderr


def test_max_model_len_auto_takes_the_longest_that_fits() -> None:
    for value in ("auto", "-1"):
        tight = config("--profile", "h100-70b", "-tp", "2", "--max-model-len", value)
        assert tight.max_model_len == tight.kv_tokens == 2_736
    assert config("--profile", "h100-70b", "-tp", "4", "--max-model-len", "auto").max_model_len == 131_072
    assert config("--profile", "h100-70b", "-tp", "2", "--max-model-len", "2048").max_model_len == 2048
    assert config("--kv-tokens", "1000", "--max-model-len", "auto").max_model_len == 992  # whole 16-token blocks


def test_unmodelled_vllm_options_are_accepted_with_a_warning(sim_process: Callable[..., SimProcess]) -> None:
    sim = sim_process("--gpu-memory-utilization", "0.9", "--dtype", "bfloat16")
    sim.wait_listening()
    sim.stop()
    assert "ignoring vLLM options the simulator does not model: --gpu-memory-utilization 0.9 --dtype bfloat16" in (
        sim.stderr_text
    )
