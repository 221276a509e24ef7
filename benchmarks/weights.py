"""New weights in place against stop-and-launch, and what a rolling update costs a running job.

    .venv/bin/python benchmarks/weights.py [--engines sim,vllm]

For each engine, one mvllmd (built-in supervisor) launches two instances from checkpoint A with
weight updates on, then, each timed from the call to the end:
- in place: `UpdateWeights` to B, both at once; then back to A with `--rolling` (one at a time);
- stop and launch, the way without weight updates: `StopInstances`, then `LaunchInstances` from B
  until both are READY.

The real vLLM CPU build serves the tiny model and its second checkpoint (`make engine`). The simulator
stands in for a GPU server at --time-scale 1: its reload takes the h100-8b profile's 3.2 s (16 GB at
about 5 GB/s) and its start --startup-delay 30 s (an assumption: about the least vLLM takes to load and
warm an 8B model on one H100; stop-and-launch there costs what that start costs).

Then, on the simulator: a job on four instances, and a rolling update while it runs. The share of the
fleet's throughput lost is 1 - (samples done during the update) / (the rate before it x its length).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from mvllm.v1 import instance_pb2, job_pb2, weights_pb2, weights_pb2_grpc
from mvllm_sim.weights import make_checkpoint

from benchkit import Daemon, engine_dir, exit_on_sigterm, machine, mvllmd, print_table, write_prompts

READY_TIMEOUT_S = 600.0
SIM_START_S = 30.0


def weights_stub(daemon: Daemon) -> weights_pb2_grpc.WeightServiceStub:
    return weights_pb2_grpc.WeightServiceStub(daemon.channel)


def update(daemon: Daemon, model: str, path: Path, rolling: bool) -> float:
    """Seconds from UpdateWeights to its last message; every instance must be DONE."""
    started = time.monotonic()
    request = weights_pb2.UpdateWeightsRequest(model=model, path=str(path), rolling=rolling)
    last = None
    for last in weights_stub(daemon).UpdateWeights(request):  # noqa: B007  (the last message is the result)
        pass
    took = time.monotonic() - started
    if last is None or any(i.step != weights_pb2.UPDATE_STEP_DONE for i in last.instances):
        raise RuntimeError(f"the update to {path} did not end DONE everywhere: {last}")
    return took


def launch(daemon: Daemon, model: str, engine: str, engine_args: Sequence[str]) -> list[instance_pb2.Instance]:
    """Launch two instances of `model` with weight updates on and wait until both are READY."""
    kind = instance_pb2.ENGINE_KIND_SIM if engine == "sim" else instance_pb2.ENGINE_KIND_VLLM
    request = instance_pb2.LaunchInstancesRequest(
        model=model, count=2, engine=kind, engine_args=list(engine_args), name_prefix="w", cpu=engine == "vllm",
        env={"VLLM_CPU_KVCACHE_SPACE": "1"} if engine == "vllm" else {}, weight_updates=True,
    )  # fmt: skip
    return daemon.start(request, READY_TIMEOUT_S)


def stop_and_launch(daemon: Daemon, model: str, engine: str, engine_args: Sequence[str]) -> float:
    started = time.monotonic()
    daemon.instances.StopInstances(instance_pb2.StopInstancesRequest(all=True))
    launch(daemon, model, engine, engine_args)
    return time.monotonic() - started


def checkpoints(engine: str, tmp: Path) -> tuple[Path, Path]:
    if engine == "vllm":
        return engine_dir() / "tiny-qwen2", engine_dir() / "tiny-qwen2-b"
    return make_checkpoint(tmp / "a", 1), make_checkpoint(tmp / "b", 2)


def compare(engine: str, tmp: Path) -> list[str]:
    a, b = checkpoints(engine, tmp)
    flags: list[str] = []
    engine_args: list[str] = []
    if engine == "vllm":
        config = tmp / "mvllmd.toml"
        config.write_text(f'[inventory]\ncpu_slots = 2\n[engine.vllm]\npython = "{engine_dir()}/venv/bin/python"\n')
        flags = ["--config", str(config)]
    else:
        engine_args = ["--time-scale", "1", "--startup-delay", str(SIM_START_S)]
    with mvllmd(2 if engine == "sim" else 0, *flags) as daemon:
        print(f"{engine}: launching two instances from A", file=sys.stderr, flush=True)
        launch(daemon, str(a), engine, engine_args)
        both = update(daemon, str(a), b, rolling=False)
        rolling = update(daemon, str(a), a, rolling=True)
        print(f"{engine}: stop, and launch from B", file=sys.stderr, flush=True)
        relaunch = stop_and_launch(daemon, str(b), engine, engine_args)
    return [engine, f"{both:.2f}", f"{rolling:.2f}", f"{relaunch:.1f}", f"{relaunch / both:,.0f} x"]


def rolling_loss(tmp: Path) -> list[str]:
    """A job on four simulated instances; a rolling update mid-way: the throughput lost while it runs."""
    a, b = checkpoints("sim", tmp)
    prompts = tmp / "prompts.parquet"
    write_prompts(prompts, 20_000)
    with mvllmd(4) as daemon:
        request = instance_pb2.LaunchInstancesRequest(
            model=str(a), count=4, engine=instance_pb2.ENGINE_KIND_SIM, engine_args=["--time-scale", "1"],
            weight_updates=True,
        )  # fmt: skip
        daemon.start(request, READY_TIMEOUT_S)
        spec = job_pb2.JobSpec(input_path=str(prompts), output_path=str(tmp / "out.parquet"), num_samples=1,
                               model=str(a), sampling=job_pb2.SamplingParams(max_tokens=256))  # fmt: skip
        job = daemon.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec)).job
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.25):
                found = daemon.jobs.GetJob(job_pb2.GetJobRequest(id=job.id)).job
                samples.append((time.monotonic(), found.samples_done))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        time.sleep(20)  # the ramp, then a steady state to measure the rate in
        begin = time.monotonic()
        took = update(daemon, str(a), b, rolling=True)
        end = time.monotonic()
        time.sleep(2)
        stop.set()
        poller.join()
        daemon.jobs.CancelJob(job_pb2.CancelJobRequest(id=job.id))
    before = [(t, n) for t, n in samples if begin - 10 <= t <= begin]
    rate = (before[-1][1] - before[0][1]) / (before[-1][0] - before[0][0])
    during = [(t, n) for t, n in samples if begin <= t <= end]
    done = during[-1][1] - during[0][1]
    expected = rate * (during[-1][0] - during[0][0])
    return [f"{took:.1f}", f"{rate:,.0f}", f"{done:,}", f"{expected:,.0f}", f"{100 * (1 - done / expected):.0f}%"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="sim,vllm", help="sim, vllm or both [sim,vllm]")
    args = p.parse_args()
    exit_on_sigterm()
    rows = []
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        with tempfile.TemporaryDirectory(prefix="mv-weights-", dir="/tmp") as tmp:
            rows.append(compare(engine, Path(tmp)))
    with tempfile.TemporaryDirectory(prefix="mv-weights-", dir="/tmp") as tmp:
        loss = rolling_loss(Path(tmp))
    print(f"{machine()}, {time.strftime('%Y-%m-%d')}. Two instances; seconds from the call to the end.\n")
    print_table(("engine", "in place (s)", "in place, rolling (s)", "stop and launch (s)", "in place is faster by"),
                rows)  # fmt: skip
    print("\nA rolling update of four simulated instances under a running job (reload 3.2 s each):\n")
    print_table(("update (s)", "samples/s before", "samples during", "at that rate", "throughput lost"), [loss])
    return 0


if __name__ == "__main__":
    sys.exit(main())
