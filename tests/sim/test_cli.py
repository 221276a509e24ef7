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
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be more than 0 and at most 1"),
        (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization must be more than 0 and at most 1"),
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
        (  # 0.88 of 80 GB is 70.4 GB a GPU: less than the weights' 70.55 GB and the 1 GB of activations
            ["--profile", "h100-70b", "-tp", "2", "--gpu-memory-utilization", "0.88"],
            "ValueError: No available memory for the cache blocks.",
        ),
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


def test_gpu_memory_utilization_sizes_the_kv_cache_where_the_profile_models_memory() -> None:
    """vLLM's flag: the engine's share of each GPU; the KV cache is what the weights and activations leave.
    h100-70b at TP2 (70.55 GB of weights and 1 GB of activations a GPU): 0.9, vLLM's default, leaves
    0.45 GB a GPU, 2,746 tokens of 327,680 B over the two, 2,736 in whole 16-token blocks; 0.95 leaves
    4.45 GB a GPU, 27,160 tokens, 27,152 in whole blocks."""
    tight = config("--profile", "h100-70b", "-tp", "2", "--max-model-len", "auto")
    roomier = config("--profile", "h100-70b", "-tp", "2", "--max-model-len", "auto", "--gpu-memory-utilization", "0.95")
    assert (tight.kv_tokens, roomier.kv_tokens) == (2_736, 27_152)
    assert roomier.max_model_len == 27_152
    same = config("--profile", "h100-70b", "-tp", "2", "--max-model-len", "auto", "--gpu-memory-utilization", "0.9")
    assert same.kv_tokens == tight.kv_tokens


def test_unmodelled_vllm_options_are_accepted_with_a_warning(sim_process: Callable[..., SimProcess]) -> None:
    sim = sim_process("--enforce-eager", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.8")
    sim.wait_listening()
    sim.stop()
    assert "ignoring vLLM options the simulator does not model: --enforce-eager --dtype bfloat16" in sim.stderr_text
    # h100-8b (the default) states its KV cache in tokens: the flag is taken, and said to change nothing.
    assert "--gpu-memory-utilization changes nothing with profile h100-8b" in sim.stderr_text
