"""The time mvllmd adds between launch and READY, over the engine's own start time.

    .venv/bin/python benchmarks/launch_overhead.py [--engine sim|vllm] [--runs 5]

engine alone: the engine's argv run directly, polled every 20 ms until /v1/models lists the model.
via mvllmd:   LaunchInstances, then ListInstances polled every 20 ms until the instance is READY
              (a daemon with the built-in supervisor, at the probe interval given).
Prints a table of medians. A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx

from mvllm.v1 import instance_pb2 as pb
from mvllm.v1 import instance_pb2_grpc

from benchkit import engine_dir, free_port

BIN = Path(sys.executable).parent
POLL_S = 0.02


def engine_alone(engine: str, model: str) -> float:
    port = free_port()
    if engine == "sim":
        argv = [sys.executable, "-m", "mvllm_sim", "--model", model, "--port", str(port), "--time-scale", "0"]
        env = dict(os.environ)
    else:
        argv = [str(engine_dir() / "venv/bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
                model, "--port", str(port), "--host", "127.0.0.1", "--served-model-name", model]  # fmt: skip
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                data = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()["data"]
                if any(m["id"] == model for m in data):
                    return time.monotonic() - start
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(POLL_S)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def via_mvllmd(stub: instance_pb2_grpc.InstanceServiceStub, engine: str, model: str) -> float:
    kind = pb.ENGINE_KIND_SIM if engine == "sim" else pb.ENGINE_KIND_VLLM
    extra = ["--time-scale", "0"] if engine == "sim" else []
    env = {} if engine == "sim" else {"VLLM_CPU_KVCACHE_SPACE": "1"}
    request = pb.LaunchInstancesRequest(model=model, count=1, engine=kind, engine_args=extra, env=env, cpu=True)
    start = time.monotonic()
    (inst,) = stub.LaunchInstances(request).instances
    try:
        while True:
            state = next(i for i in stub.ListInstances(pb.ListInstancesRequest()).instances if i.name == inst.name)
            if state.state == pb.INSTANCE_STATE_READY:
                return time.monotonic() - start
            if state.state == pb.INSTANCE_STATE_FAILED:
                raise RuntimeError(state.message)
            time.sleep(POLL_S)
    finally:
        stub.StopInstances(pb.StopInstancesRequest(all=True, force=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["sim", "vllm"], default="sim")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--probe-intervals", default="2.0,0.2")
    args = p.parse_args()
    model = "bench-model" if args.engine == "sim" else str(engine_dir() / "tiny-qwen2")
    alone = statistics.median(engine_alone(args.engine, model) for _ in range(args.runs))
    rows = []
    for interval in args.probe_intervals.split(","):
        with tempfile.TemporaryDirectory(prefix="mv-bench-", dir="/tmp") as tmp:
            sock = f"{tmp}/m.sock"
            daemon = subprocess.Popen(
                [str(BIN / "mvllmd"), "--listen", f"unix:{sock}", "--state-dir", f"{tmp}/state", "--sim-gpus", "1",
                 "--cpu-slots", "1", "--unit-manager", "process", "--probe-interval", interval,
                 "--vllm-python", str(engine_dir() / "venv/bin/python"), "--log-level", "warning"],
            )  # fmt: skip
            try:
                while not Path(sock).exists():
                    time.sleep(0.05)
                with grpc.insecure_channel(f"unix:{sock}") as channel:
                    stub = instance_pb2_grpc.InstanceServiceStub(channel)
                    grpc.channel_ready_future(channel).result(timeout=20)
                    via = statistics.median(via_mvllmd(stub, args.engine, model) for _ in range(args.runs))
            finally:
                daemon.terminate()
                daemon.wait(60)
        rows.append((interval, via))
    print(f"launch to READY, {args.engine} engine, median of {args.runs}, {time.strftime('%Y-%m-%d')}, "
          f"{platform.node()} ({os.cpu_count()} cores)\n")  # fmt: skip
    print("| probe interval (s) | engine alone (s) | via mvllmd (s) | added by mvllmd (s) |")
    print("|---|---|---|---|")
    for interval, via in rows:
        print(f"| {interval} | {alone:.2f} | {via:.2f} | {via - alone:+.2f} |")


if __name__ == "__main__":
    main()
