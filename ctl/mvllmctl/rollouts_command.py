"""`mvllmctl generate-rollouts`: the seed's generate_rollouts.py flags, so existing scripts keep working.

With mvllmd running it submits a job there and waits for it; without, it runs the same job runner in
this process. Either way the output has mvllm's schema (one row per prompt and sample, sorted).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import grpc

from mvllm.convert import spec_to_proto
from mvllm.jobs import JobSpec, validate
from mvllm.v1 import daemon_pb2, daemon_pb2_grpc
from mvllm.v1 import job_pb2 as pb
from mvllmctl.client import CtlError
from mvllmctl.context import Ctl, pass_ctl
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.job_commands import follow, print_summary, stub, usage_errors
from mvllmctl.progress import JobProgress

if TYPE_CHECKING:
    from mvllmd.local import Progress

PROBE_TIMEOUT_S = 2.0


@click.command("generate-rollouts", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--use_vllm", is_flag=True, help="Accepted for the seed's scripts; generation always uses vLLM servers.")
@click.option("--vllm_base_url", metavar="URL,URL", help="Comma-separated servers. [mvllmd's READY instances]")
@click.option("--model_path", metavar="MODEL", help="The served model. [the only one served]")
@click.option("--data_path", required=True, type=click.Path(path_type=Path), help="Prompts: .parquet or .jsonl.")
@click.option("--output_path", required=True, type=click.Path(path_type=Path), help="One .parquet file.")
@click.option("--num_samples", type=int, default=1, show_default=True, help="Samples per prompt.")
@click.option("--vllm_max_concurrent", type=int, default=200, show_default=True, help="Requests at once.")
@click.option("--resume", is_flag=True, help="Finish an existing output or its parts.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@pass_ctl
def generate_rollouts(ctl: Ctl, /, **options: Any) -> int:
    """The seed script's command line (generate_rollouts.py), on mvllm's job runner: balanced, retried,
    resumable. Uses mvllmd when it runs (`mvllmctl submit` has every option), else runs here.

    \b
    mvllmctl generate-rollouts --use_vllm \\
        --vllm_base_url "http://localhost:8000/v1,http://localhost:8001/v1" \\
        --model_path Qwen/Qwen2.5-7B-Instruct --data_path data.parquet \\
        --output_path rollouts.parquet --num_samples 10 --vllm_max_concurrent 200
    """
    if options["resume"] and options["overwrite"]:
        raise click.UsageError("--resume and --overwrite exclude each other")
    urls = [u.strip() for u in (options["vllm_base_url"] or "").split(",") if u.strip()]
    with usage_errors():
        spec = validate(_spec(options, urls))
    if _daemon_answers(ctl):
        click.echo(f"using mvllmd at {ctl.client.address}", err=True)
        submitted = ctl.client.call(stub(ctl).SubmitJob, pb.SubmitJobRequest(spec=spec_to_proto(spec))).job
        click.echo(f"job {submitted.id}: {submitted.samples_total} samples -> {submitted.output_path}", err=True)
        return follow(ctl, submitted.id, as_json=False)
    if not urls:
        raise CtlError(
            f"mvllmd is not running at {ctl.client.address}, so --vllm_base_url is needed to run here",
            ExitStatus.USAGE,
        )
    click.echo("mvllmd is not running: generating in this process", err=True)
    return asyncio.run(_run_here(options, urls))


def _spec(options: dict[str, Any], urls: list[str]) -> JobSpec:
    """The job the seed's flags ask for (the defaults for all they cannot say)."""
    return JobSpec(
        input_path=options["data_path"].absolute(),
        output_path=options["output_path"].absolute(),
        num_samples=options["num_samples"],
        model=options["model_path"] or "",
        max_concurrent=options["vllm_max_concurrent"],
        endpoints=tuple(urls),
        resume=options["resume"],
        overwrite=options["overwrite"],
    )


def _daemon_answers(ctl: Ctl) -> bool:
    try:
        daemon_pb2_grpc.DaemonServiceStub(ctl.client.channel()).GetDaemonInfo(
            daemon_pb2.GetDaemonInfoRequest(), timeout=PROBE_TIMEOUT_S
        )
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return False
        raise
    return True


async def _run_here(options: dict[str, Any], urls: list[str]) -> int:
    # The job runner (pyarrow, numpy) is imported here, not at the top: every other command of
    # mvllmctl would pay for it at each start (half a second of CPU).
    from mvllmd.local import JobError, OutOfSpace, StorageError, run_here  # noqa: PLC0415

    spec = _spec(options, urls)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    try:
        with JobProgress() as bar:
            outcome = await run_here(
                spec, stop, on_progress=lambda p: bar.update(_as_job(p, spec, pb.JOB_STATE_RUNNING))
            )
    except OutOfSpace as exc:
        raise CtlError(str(exc), ExitStatus.EXHAUSTED) from None
    except StorageError as exc:
        raise CtlError(str(exc), ExitStatus.FAILED) from None
    except JobError as exc:
        raise CtlError(str(exc), ExitStatus.USAGE) from None
    progress = outcome.progress
    state = pb.JOB_STATE_SUCCEEDED if outcome.complete else pb.JOB_STATE_CANCELLED
    print_summary(_as_job(progress, spec, state))
    if not outcome.complete:
        click.echo(
            f"\ninterrupted: {progress.samples_done} of {progress.samples_total} samples are kept in "
            f"{outcome.parts}; run the same command with --resume to finish",
            err=True,
        )
        return ExitStatus.INTERRUPTED
    return ExitStatus.SUCCESS


def _as_job(progress: Progress, spec: JobSpec, state: int) -> pb.Job:
    """This process's progress in the daemon's terms, for the same progress bar and summary."""
    job = pb.Job(
        id="local",
        state=state,  # type: ignore[arg-type]
        samples_total=progress.samples_total,
        samples_done=progress.samples_done,
        errors=progress.errors,
        output_path=str(spec.output_path),
        completion_tokens=progress.tokens,
        tokens_per_second=progress.tokens_per_s,
    )
    job.started_at.FromNanoseconds(int((time.time() - (time.monotonic() - progress.started)) * 1e9))
    return job
