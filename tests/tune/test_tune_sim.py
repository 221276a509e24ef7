"""`mvllmctl tune` against mvllm-sim on simulated GPUs: the sweep, the recommendation, bad input, Ctrl-C and
a restart of mvllmd mid-trial.

The simulator's profiles are derived from published H100 figures (sim/mvllm_sim/profiles.toml); each
instance runs at most 32 sequences (--max-num-seqs) so that this 2-core machine keeps every batch full.
The figures are per simulated second (the simulator's clock gauge), so they do not depend on how busy the
machine is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from daemonkit import MVLLMCTL, DaemonProcess, Spawn, assert_short_error, instance_status, wait_for

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"
SMALL, LARGE = str(MODELS / "llama-3.1-8b"), str(MODELS / "llama-3.1-70b")
SWEEP = ("--engine", "sim", "--max-num-seqs", "32")


def sim(profile: str, *more: str) -> tuple[str, ...]:
    return ("--", "--profile", profile, "--time-scale", "1", *more)


def start(spawn: Spawn, tmp: Path, gpus: int = 8) -> DaemonProcess:
    args = ["--listen", f"unix:{tmp}/mvllmd.sock", "--state-dir", str(tmp / "state"), "--sim-gpus", str(gpus)]
    return spawn([*args, "--unit-manager", "process", "--probe-interval", "0.5"])  # READY seen sooner


def splits(report: dict[str, Any]) -> list[str]:
    return [f"{t['split']['instances']}x{t['split']['tensor_parallel_size']}" for t in report["trials"]]


def phases(report: dict[str, Any]) -> list[str]:
    return [t["phase"].removeprefix("TRIAL_PHASE_") for t in report["trials"]]


def test_8b_on_8_h100s_recommends_8_x_tp1(spawn: Spawn, short_tmp: Path) -> None:
    """Every split fits and is measured; the smaller the TP the more tokens per simulated second (the
    seed's table: 8 x TP1 at 2.8x of 1 x TP8), and 8 x TP1 is recommended. Nothing is left running."""
    daemon = start(spawn, short_tmp)
    done = daemon.ctl("tune", SMALL, *SWEEP, "--budget", "40", "--json", *sim("h100-8b"), timeout=240)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["report"]
    assert splits(report) == ["8x1", "4x2", "2x4", "1x8"] and phases(report) == ["DONE"] * 4
    assert report["clock"] == "TUNE_CLOCK_SIMULATED" and report["complete"] and report["best"] == 0
    assert all(t["estimate"]["fit"] == "FIT_FITS" for t in report["trials"])
    rates = [t["tokens_per_second"] for t in report["trials"]]
    assert rates == sorted(rates, reverse=True), rates
    trials = report["trials"]
    assert trials[3]["speedup"] == 1.0 and trials[0]["speedup"] > 2.0, [t["speedup"] for t in trials]
    for t in trials:
        assert t["tokens_per_second_low"] <= t["tokens_per_second"] <= t["tokens_per_second_high"]
        assert len(t["interval_tokens_per_second"]) >= 8 and t["measured_seconds"] > 0 and t["launch_seconds"] > 0
        assert abs(t["estimated_total_seconds"] * t["samples_per_second"] - 10_000) < 1  # the synthetic set
    assert report["recommendation"].startswith("8 x TP1: ")
    assert instance_status(daemon.ctl) == []
    shown = daemon.ctl("tune", "--show")  # the table again, from the state directory
    assert shown.returncode == 0, shown.stderr
    assert "8 x TP1 *" in shown.stdout and "Recommendation: 8 x TP1" in shown.stdout
    assert "TOKENS/simulated s (SPREAD)" in shown.stdout
    drawn = daemon.ctl("tune", "--show", "--plot", str(short_tmp / "sweep.png"))
    assert drawn.returncode == 0, drawn.stderr
    assert (short_tmp / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unwritable = daemon.ctl("tune", "--show", "--plot", str(short_tmp / "no" / "such" / "dir" / "sweep.png"))
    assert_short_error(unwritable, 2, "--plot", "cannot write it")


def test_70b_skips_tp1_tries_the_tight_tp2_and_recommends_what_fits(spawn: Spawn, short_tmp: Path) -> None:
    """141 GB of bf16 weights: TP1 does not fit on an 80 GB GPU and is not tried; TP2 fits them with
    little room for the KV cache (2,736 tokens in the simulator, as vLLM works it out) and is tried; the
    best split that fits is recommended. With the model's own context (131,072 tokens) TP2's engine
    refuses to start, as vLLM does, and the trial says why; with --max-model-len 2048 it runs."""
    daemon = start(spawn, short_tmp)
    refused = daemon.ctl("tune", LARGE, *SWEEP, "--configs", "4x2", "--budget", "30", "--json", *sim("h100-70b"))
    assert refused.returncode == 1, refused.stderr  # no split measured
    (tight,) = json.loads(refused.stdout)["report"]["trials"]
    assert tight["phase"] == "TRIAL_PHASE_FAILED" and tight["estimate"]["fit"] == "FIT_TIGHT"
    assert "larger than the available KV cache memory" in tight["message"]
    assert instance_status(daemon.ctl) == []
    done = daemon.ctl("tune", LARGE, *SWEEP, "--budget", "40", "--json", *sim("h100-70b", "--max-model-len", "2048"),
                      timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["report"]
    trials = report["trials"]
    assert phases(report) == ["SKIPPED", "DONE", "DONE", "DONE"]
    assert [t["estimate"]["fit"] for t in trials] == ["FIT_DOES_NOT_FIT", "FIT_TIGHT", "FIT_FITS", "FIT_FITS"]
    assert trials[0]["message"].startswith("not tried: 141.1 GB of weights on each device")
    assert not trials[0]["instances"]
    assert trials[1]["tokens_per_second"] > 0 and "little room" in report["recommendation"]
    best = max(range(1, 4), key=lambda i: trials[i]["tokens_per_second"])
    assert report["best"] == best and report["recommendation"].startswith(splits(report)[best].replace("x", " x TP"))
    assert "8 x TP1 cannot hold the model" in report["recommendation"]
    assert instance_status(daemon.ctl) == []


def test_apply_leaves_the_best_split_running(spawn: Spawn, short_tmp: Path) -> None:
    """--apply: once the sweep ends, the recommended split is launched for good (named after the model, not
    a trial's), and serves jobs."""
    daemon = start(spawn, short_tmp)
    sweep = ("--devices", "0-1", "--budget", "20", "--apply", "--json", *sim("h100-8b"))
    done = daemon.ctl("tune", SMALL, *SWEEP, *sweep, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["report"]
    assert splits(report) == ["2x1", "1x2"] and report["best"] == 0
    assert report["applied_instances"] == ["llama-3-1-8b-0", "llama-3-1-8b-1"]
    instances = instance_status(daemon.ctl)
    assert [(i["name"], i["state"], i["trial"], i["devices"]) for i in instances] == [
        ("llama-3-1-8b-0", "INSTANCE_STATE_READY", False, ["sim-gpu:0"]),
        ("llama-3-1-8b-1", "INSTANCE_STATE_READY", False, ["sim-gpu:1"]),
    ]


def test_bad_input_is_one_line_and_launches_nothing(spawn: Spawn, short_tmp: Path) -> None:
    daemon = start(spawn, short_tmp)
    garbage = short_tmp / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not really")
    cases = [
        (("tune", LARGE, *SWEEP, "--devices", "0"), 4, "fits on none of these splits", "need TP 2 or more"),
        (("tune", SMALL, *SWEEP, "--configs", "3x2"), 2, "3 x TP2 takes 6 sim-gpus; a split uses all 8 chosen"),
        (("tune", SMALL, *SWEEP, "--data", str(short_tmp / "none.parquet")), 2, "no such file"),
        (("tune", SMALL, *SWEEP, "--data", str(garbage)), 2, "not a readable parquet file"),
        (("tune", SMALL, *SWEEP, "--devices", "9"), 2, "there is no sim-gpu 9"),
        (("tune", "--show"), 1, "no sweep has ended on this daemon yet"),
    ]
    held = ("tune", SMALL, *SWEEP, "--devices", "0-3"), 4, "held by mvllmd's instances: sim-gpu 2 by other-0"
    for argv, code, *fragments in cases:
        _one_line(daemon.ctl(*argv), code, *fragments)
    # A --configs that is not INSTANCESxTP is a usage error, which click shows with the usage line.
    assert_short_error(daemon.ctl("tune", SMALL, "--configs", "8y1"), 2, "'8y1': give INSTANCESxTP, e.g. 8x1,4x2")
    assert instance_status(daemon.ctl) == []  # nothing launched
    launched = daemon.ctl("launch", "other", "--engine", "sim", "--devices", "2", "--name", "other")
    assert launched.returncode == 0, launched.stderr
    _one_line(daemon.ctl(*held[0]), held[1], held[2])
    assert [i["name"] for i in instance_status(daemon.ctl)] == ["other-0"]


def _one_line(done: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert_short_error(done, code, *fragments)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_ctrl_c_mid_trial_leaves_nothing(spawn: Spawn, short_tmp: Path) -> None:
    """SIGINT while a trial runs its job: mvllmctl cancels the sweep, waits until the daemon has removed the
    trial's instances, and exits 130; no instance, spec or engine process is left."""
    daemon = start(spawn, short_tmp)
    data = short_tmp / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [f"question {i}" for i in range(5000)]}), data)
    sweep = (*SWEEP, "--configs", "1x8", "--data", str(data), "--budget", "300", *sim("h100-8b"))
    with _tune_in_background(daemon, SMALL, *sweep) as tune:
        pids = _wait_running(daemon, tune)
        tune.send_signal(signal.SIGINT)
        said = tune.communicate(timeout=60)[1]
    assert tune.returncode == 130, said
    assert "removing its instances" in said
    assert instance_status(daemon.ctl) == []
    assert not list((short_tmp / "state" / "instances").glob("*.json"))
    assert not [pid for pid in pids if _alive(pid)]
    shown = daemon.ctl("tune", "--show")
    assert "did not run to its end" in shown.stdout  # the report says what it measured, and that it stopped


def test_a_restarted_mvllmd_removes_a_trials_instances(spawn: Spawn, short_tmp: Path) -> None:
    """mvllmd killed (-9) mid-trial: its trial's engines outlive it; started again, it removes them
    instead of re-adopting them."""
    daemon = start(spawn, short_tmp)
    with _tune_in_background(daemon, SMALL, *SWEEP, "--configs", "1x8", "--budget", "300", *sim("h100-8b")) as tune:
        pids = _wait_running(daemon, tune)
        daemon.proc.kill()
        daemon.proc.wait(30)
        said = tune.communicate(timeout=60)[1]
    assert tune.returncode == 3, said  # the daemon is gone: unreachable
    assert all(_alive(pid) for pid in pids)  # the engines outlived it
    again = start(spawn, short_tmp)
    assert instance_status(again.ctl) == []
    wait_for(lambda: not [pid for pid in pids if _alive(pid)], 30)
    assert "left by a tune trial" in again.stderr


def _tune_in_background(daemon: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    argv = [MVLLMCTL, "--address", daemon.address, "tune", *args]
    return subprocess.Popen(argv, env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_running(daemon: DaemonProcess, tune: subprocess.Popen[str]) -> list[int]:
    """Wait for the first trial's job to run (mvllmctl says so on stderr, a line per phase); its engines' PIDs."""
    assert tune.stderr is not None
    deadline = time.monotonic() + 120
    for line in tune.stderr:
        if "warming up" in line:
            break
        assert time.monotonic() < deadline and tune.poll() is None, line
    instances = instance_status(daemon.ctl)
    assert instances and all(i["trial"] for i in instances)
    return [i["pid"] for i in instances]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
