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
    ],
)
def test_refusals(args: list[str], message: str) -> None:
    done = subprocess.run([MVLLM_SIM, *args], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_unmodelled_vllm_options_are_accepted_with_a_warning(sim_process: Callable[..., SimProcess]) -> None:
    sim = sim_process("--gpu-memory-utilization", "0.9", "--dtype", "bfloat16")
    sim.wait_listening()
    sim.stop()
    assert "ignoring vLLM options the simulator does not model: --gpu-memory-utilization 0.9 --dtype bfloat16" in (
        sim.stderr_text
    )
