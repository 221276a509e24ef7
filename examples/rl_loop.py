"""An RL trainer's loop over mvllmd's gRPC API: generate, read, train, update the weights, again.

    python examples/rl_loop.py --address unix:$XDG_RUNTIME_DIR/mvllmd/mvllmd.sock --model MODEL \\
        --prompts examples/prompts.parquet --checkpoints CKPT_DIR --work /tmp/rl --iterations 3

The instances of MODEL were launched with weight updates on (`mvllmctl launch MODEL --weight-updates`)
from the checkpoint CKPT_DIR/step-0. Each iteration submits a job pinned to the version it expects,
watches it to the end, reads its rows (each says which weights made it), "trains" (a stand-in: it
copies CKPT_DIR/step-(i+1) into WORK as the new checkpoint), and loads that into every instance in
place. The same calls with grpcurl are in the README ("The RL loop").
"""

from __future__ import annotations

import argparse
import shutil
from collections import Counter
from pathlib import Path

import grpc
import pyarrow.parquet as pq

from mvllm.v1 import job_pb2, job_pb2_grpc, weights_pb2, weights_pb2_grpc


def generate(jobs: job_pb2_grpc.JobServiceStub, model: str, prompts: Path, out: Path, version: str) -> None:
    """Submit a job whose work goes only to servers at `version`, and watch it to its end."""
    sampling = job_pb2.SamplingParams(max_tokens=64)
    spec = job_pb2.JobSpec(input_path=str(prompts), output_path=str(out), model=model, num_samples=4,
                           sampling=sampling, overwrite=True, weight_version=version)  # fmt: skip
    job = jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec)).job
    for update in jobs.WatchJob(job_pb2.WatchJobRequest(id=job.id)):
        job = update.job
    if job.state != job_pb2.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"job {job.id} ended {job_pb2.JobState.Name(job.state)}: {job.message}")


def update_weights(weights: weights_pb2_grpc.WeightServiceStub, model: str, path: Path, version: str) -> None:
    """Load the checkpoint at `path` into every instance of `model`, in place."""
    request = weights_pb2.UpdateWeightsRequest(model=model, path=str(path), version=version)
    last = None
    for last in weights.UpdateWeights(request):  # noqa: B007  (the last message is the result)
        pass
    failed = [i.name for i in last.instances if i.step == weights_pb2.UPDATE_STEP_FAILED] if last else ["all"]
    if failed:
        raise SystemExit(f"the update to {version} failed on {', '.join(failed)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="mvllmd's gRPC address, e.g. unix:/run/mvllmd/mvllmd.sock")
    parser.add_argument("--model", required=True, help="The served model name.")
    parser.add_argument("--prompts", type=Path, required=True, help="A parquet file with a `prompt` column.")
    parser.add_argument("--checkpoints", type=Path, required=True, help="step-0, step-1, ...: what training makes.")
    parser.add_argument("--work", type=Path, required=True, help="Where rollouts and new checkpoints go.")
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    with grpc.insecure_channel(args.address) as channel:
        jobs, weights = job_pb2_grpc.JobServiceStub(channel), weights_pb2_grpc.WeightServiceStub(channel)
        version = "step-0"  # the instances were launched from CKPT_DIR/step-0
        for i in range(args.iterations):
            out = args.work / f"rollouts-{i}.parquet"
            generate(jobs, args.model, args.prompts.absolute(), out.absolute(), version)
            rows = pq.read_table(out, columns=["weight_version", "completion_tokens"])
            versions = Counter(rows.column("weight_version").to_pylist())
            print(f"iteration {i}: {rows.num_rows} rows, made by {dict(versions)}")
            version = f"step-{i + 1}"
            checkpoint = args.work / version  # "training": the next checkpoint, copied into place
            shutil.copytree(args.checkpoints / version, checkpoint, dirs_exist_ok=True)
            update_weights(weights, args.model, checkpoint.absolute(), version)


if __name__ == "__main__":
    main()
