"""What a sweep decides before anything starts: the model's size, which splits hold it, the splits to try;
and how a trial's readings become its figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mvllmd.errors import InvalidRequest
from mvllmd.tune.fit import Fit, estimate, model_size, smallest_tp, utilization
from mvllmd.tune.measure import Meter, Reading, figure, sure
from mvllmd.tune.splits import Split, candidates, checked

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"
H100 = 80 * 2**30  # a simulated GPU's memory, an H100 80GB's


def test_the_llama_configs_give_their_published_sizes() -> None:
    """8.03 and 70.55 billion parameters (Meta's model cards: 8B and 70B), served in bf16."""
    small, large = model_size(str(MODELS / "llama-3.1-8b")), model_size(str(MODELS / "llama-3.1-70b"))
    assert small is not None and large is not None
    assert round(small.weights_bytes / 2 / 1e9, 2) == 8.03
    assert round(large.weights_bytes / 2 / 1e9, 2) == 70.55
    assert small.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB, as the h100-8b profile says
    assert large.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2


def test_a_70b_model_on_80_gb_gpus() -> None:
    size = model_size(str(MODELS / "llama-3.1-70b"))
    fits = {tp: estimate(size, tp, H100, 0.9) for tp in (1, 2, 4, 8)}
    assert fits[1].fit is Fit.DOES_NOT_FIT and "do not fit" in fits[1].note
    assert fits[2].fit is Fit.TIGHT and "70.6 GB of weights on each device, of 77.3 GB usable" in fits[2].note
    assert fits[4].fit is fits[8].fit is Fit.FITS
    assert smallest_tp(size, H100, 0.9) == 2  # type: ignore[arg-type]
    assert smallest_tp(size, 40 * 2**30, 0.9) == 4  # type: ignore[arg-type]
    # vLLM's --gpu-memory-utilization moves the line: at 0.95 TP2 has more room, at 0.8 none.
    assert estimate(size, 2, H100, utilization(("--gpu-memory-utilization", "0.8"))).fit is Fit.DOES_NOT_FIT
    assert utilization(("--gpu-memory-utilization=0.95",)) == 0.95
    assert utilization(("--gpu-memory-utilization", "2")) == 0.9  # not a share: vLLM's default


def test_the_size_comes_from_the_checkpoint_first(tmp_path: Path) -> None:
    config = json.loads((MODELS / "llama-3.1-8b" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    index = {"metadata": {"total_size": 16_000_000_000}, "weight_map": {}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    found = model_size(str(tmp_path))
    assert found is not None and found.weights_bytes == 16_000_000_000 and found.source == "the safetensors index"
    # An fp32 checkpoint runs in bf16 (vLLM's --dtype auto), unless --dtype says float32.
    (tmp_path / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    assert model_size(str(tmp_path)).weights_bytes == 8_000_000_000  # type: ignore[union-attr]
    assert model_size(str(tmp_path), ("--dtype", "float32")).weights_bytes == 16_000_000_000  # type: ignore[union-attr]


def test_a_hub_model_is_sized_from_the_engines_cache(tmp_path: Path) -> None:
    """HF_HOME's layout: hub/models--ORG--NAME/snapshots/REV, refs/main naming the revision."""
    repo = tmp_path / "hub" / "models--meta-llama--Llama-3.1-70B-Instruct"
    for rev in ("old", "abc123"):
        (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text((MODELS / "llama-3.1-70b" / "config.json").read_text())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    found = model_size("meta-llama/Llama-3.1-70B-Instruct", hf_home=tmp_path)
    assert found is not None and round(found.weights_bytes / 1e9, 1) == 141.1
    assert model_size("meta-llama/Llama-3.1-8B-Instruct", hf_home=tmp_path) is None  # not in the cache


def test_a_model_that_cannot_be_sized_is_unknown_and_tried(tmp_path: Path) -> None:
    assert model_size("meta-llama/Llama-3.1-8B-Instruct") is None  # a hub name, no cache given
    assert model_size(str(tmp_path)) is None  # no config.json
    quantized = {**json.loads((MODELS / "llama-3.1-8b" / "config.json").read_text()), "quantization_config": {}}
    (tmp_path / "config.json").write_text(json.dumps(quantized))
    assert model_size(str(tmp_path)) is None  # its bytes per weight are not in the config
    assert estimate(None, 1, H100, 0.9).fit is Fit.UNKNOWN
    cpu = estimate(model_size(str(MODELS / "llama-3.1-8b")), 1, 0, 0.9)  # a CPU slot: no memory known
    assert cpu.fit is Fit.UNKNOWN and "memory is not known" in cpu.note


def test_the_splits_of_the_devices() -> None:
    assert candidates(8, 8) == [Split(8, 1), Split(4, 2), Split(2, 4), Split(1, 8)]
    assert candidates(6, 6) == [Split(6, 1), Split(3, 2)]
    assert candidates(2, 1) == [Split(2, 1)]  # CPU slots: TP 1 only
    assert checked([Split(4, 2), Split(1, 8)], 8, 8, "gpu") == [Split(4, 2), Split(1, 8)]
    with pytest.raises(InvalidRequest, match=r"3 x TP2 takes 6 gpus; a split uses all 8 chosen .*8x1, 4x2, 2x4, 1x8"):
        checked([Split(3, 2)], 8, 8, "gpu")
    with pytest.raises(InvalidRequest, match="TP a power of two"):
        checked([Split(2, 3)], 6, 6, "gpu")
    with pytest.raises(InvalidRequest, match="cpu-slots run TP 1 at most"):
        checked([Split(1, 2)], 2, 1, "cpu-slot")
    with pytest.raises(InvalidRequest, match="given twice"):
        checked([Split(8, 1), Split(8, 1)], 8, 8, "gpu")


def reading(tokens: float, finished: float, clock: float | None, wall: float, running: float = 8) -> Reading:
    return Reading(tokens, finished, running, clock, wall)


def test_the_meter_reads_rates_on_the_simulators_clock() -> None:
    """Two instances, each over its own clock: the sum of their rates, per simulated second, whatever
    the wall clock did (here it ran ten times faster)."""
    meter = Meter()
    assert meter.add([reading(0, 0, 100.0, 1.0), reading(0, 0, 50.0, 1.0)]) is None
    interval = meter.add([reading(1000, 10, 102.0, 1.2), reading(300, 3, 51.0, 1.2)])
    assert interval is not None and meter.simulated
    assert interval.tokens_per_s == 1000 / 2 + 300 / 1 and interval.samples_per_s == 10 / 2 + 3 / 1
    assert interval.span_s == 1.5 and interval.finished == 13 and interval.running == 16
    # One reading without the clock (a real engine): from then on, the wall clock.
    wall = meter.add([reading(2000, 20, None, 1.7), reading(600, 6, 52.0, 1.7)])
    assert wall is not None and not meter.simulated and wall.tokens_per_s == 1000 / 0.5 + 300 / 0.5


def test_a_figure_is_the_median_with_its_spread_and_sure_when_steady() -> None:
    meter, steady = Meter(), []
    meter.add([reading(0, 0, 0.0, 0.0)])
    for i, rate in enumerate([100, 104, 98, 101, 99, 103, 97, 102], start=1):
        interval = meter.add([reading(meter.last[0].tokens + rate, i, float(i), float(i))])
        assert interval is not None
        steady.append(interval)
        assert sure(steady) == (i == 8)  # eight intervals within 2 % of their mean's standard error
    found = figure(steady)
    assert found is not None and found.tokens_per_s == 100.5 and (found.low, found.high) == (97, 104)
    assert not sure([*steady[:7], steady[0].__class__(300, 1, 8, 8, 1.0)])  # a jump: not sure yet
    assert figure([]) is None
