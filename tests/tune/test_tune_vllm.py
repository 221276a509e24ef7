"""`mvllmctl tune` on the real vLLM CPU build with the tiny model (`make engine`), over a CPU slot, within a
two-minute budget: a table and a recommendation, on the wall clock (vLLM has no simulated one), and
nothing left running."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daemonkit import MVLLMCTL, Spawn, engine_dir, instance_status, process_group

pytestmark = pytest.mark.vllm


def test_a_sweep_of_real_vllm_on_a_cpu_slot(spawn: Spawn, short_tmp: Path) -> None:
    engine = engine_dir()
    python = str(engine / "venv" / "bin" / "python")
    args = ["--listen", f"unix:{short_tmp}/mvllmd.sock", "--state-dir", str(short_tmp / "state"),
            "--unit-manager", "process", "--cpu-slots", "1", "--vllm-python", python]  # fmt: skip
    daemon = spawn(args)
    # Short prompts: the tiny model's byte-level tokens make the synthetic set's questions long, and a
    # prefill-bound engine's rate swings (about 320 to 780 tokens/s from one interval to the next here), so
    # that its figure is sure only at the end of its window; with these it is sure within about 35 s.
    data = short_tmp / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [f"Question {i}: what comes next?" for i in range(20_000)]}), data)
    argv = [MVLLMCTL, "--address", daemon.address, "tune", str(engine / "tiny-qwen2"), "--cpu", "--budget", "120",
            "--data", str(data), "--max-tokens", "32", "--json", "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--",
            "-O0"]  # fmt: skip
    pids: set[int] = set()
    with subprocess.Popen(argv, env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as tune:
        watching = threading.Thread(target=_note_pids, args=(daemon.ctl, tune, pids))
        watching.start()
        out, err = tune.communicate(timeout=240)
        watching.join()
    assert tune.returncode == 0, err
    report = json.loads(out)["report"]
    (trial,) = report["trials"]
    assert trial["split"] == {"instances": 1, "tensor_parallel_size": 1} and trial["phase"] == "TRIAL_PHASE_DONE"
    assert trial["estimate"]["fit"] == "FIT_UNKNOWN"  # a CPU slot's memory is not known: tried
    assert report["clock"] == "TUNE_CLOCK_WALL" and report["best"] == 0 and report["complete"]
    assert trial["tokens_per_second"] > 0 and trial["samples_per_second"] > 0 and trial["launch_seconds"] > 0
    assert report["recommendation"].startswith("1 x TP1: ") and report["data_path"] == str(data)
    assert int(report["prompts"]) == 20_000  # (a uint64: a string in proto3 JSON)
    assert abs(trial["estimated_total_seconds"] * trial["samples_per_second"] - 20_000) < 1  # the whole file
    assert report["ended_at"] - report["started_at"] < 120 + 10  # the budget held (stopping included)
    assert pids, "the trial's engine was never seen"
    assert instance_status(daemon.ctl) == []
    assert not [pid for pid in pids if process_group(pid)], "an engine process of the trial is still running"


def _note_pids(ctl: object, tune: subprocess.Popen[str], pids: set[int]) -> None:
    """Note the trial's engines' PIDs while the sweep runs (each is its process group's leader)."""
    while tune.poll() is None:
        done = ctl("status", "--json")  # type: ignore[operator]
        if done.returncode == 0:
            pids.update(i["pid"] for i in json.loads(done.stdout)["instances"] if i["trial"] and i["pid"])
        time.sleep(1)
