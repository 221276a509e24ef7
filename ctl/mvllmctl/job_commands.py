"""`mvllmctl submit | jobs | job | watch | cancel`: rollout jobs, from a prompt file to one parquet file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from mvllm.v1 import job_pb2 as pb
from mvllm.v1 import job_pb2_grpc
from mvllmctl.client import CtlError
from mvllmctl.context import Ctl, json_option, pass_ctl
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.output import duration, print_fields, print_json, print_table
from mvllmctl.progress import JobProgress

POLICIES = {"least-loaded": pb.POLICY_LEAST_LOADED, "round-robin": pb.POLICY_ROUND_ROBIN}
ON_ERROR = {"record": pb.ON_ERROR_RECORD, "fail": pb.ON_ERROR_FAIL}
ENDED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
CANCEL_WAIT_S = 120.0  # a cancel lets requests in flight finish first


def state_name(value: int) -> str:
    return pb.JobState.Name(value).removeprefix("JOB_STATE_")


def stub(ctl: Ctl) -> job_pb2_grpc.JobServiceStub:
    return job_pb2_grpc.JobServiceStub(ctl.client.channel())


def _extra_body(text: str | None) -> str:
    if not text:
        return ""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--extra-body") from None
    if not isinstance(value, dict):
        raise click.BadParameter("a JSON object is expected, e.g. '{\"top_k\": 20}'", param_hint="--extra-body")
    return text


def sampling_options(f: Any) -> Any:
    """The sampling flags, shared by `submit` and nothing else (generate-rollouts keeps the seed's)."""
    options = [
        click.option("--max-tokens", type=click.IntRange(1), help="Per sample. [the server's default]"),
        click.option("--temperature", type=click.FloatRange(0, 100), help="[1.0]"),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="[1.0]"),
        click.option("--stop", multiple=True, metavar="TEXT", help="Stop string (repeatable)."),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Reproducible samples. [no seed sent]"),
        click.option("--extra-body", metavar="JSON", help="Merged into each request, e.g. '{\"top_k\": 20}'."),
        click.option("--logprobs", type=click.IntRange(0, 20), metavar="N", help="Add the top-N token logprobs."),
        click.option("--return-token-ids", is_flag=True, help="Add the token ids the server reports."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command()
@click.option(
    "--data", "-d", "data", required=True, type=click.Path(path_type=Path), help="Prompts: .parquet or .jsonl."
)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="The result: one .parquet file.")
@click.option("--num-samples", "-k", type=click.IntRange(1), default=1, show_default=True, help="Samples per prompt.")
@click.option("--model", "-m", help="The served model. [the only one served]")
@click.option("--prompt-column", default="prompt", show_default=True, help="String or list of {role, content}.")
@click.option("--max-concurrent", type=click.IntRange(1), help="Samples in flight at most. [daemon's, 1024]")
@click.option("--policy", type=click.Choice(sorted(POLICIES)), default="least-loaded", show_default=True)
@click.option(
    "--no-hedge",
    is_flag=True,
    help="No tail handling. In the tail, running samples move to quicker servers, each continued from the"
    " tokens it made (unseeded jobs with --max-tokens >= 128 and no --stop), or else slow requests are"
    " copied there (seeded copies are identical; unseeded, a copy is a new draw and the first answer"
    " wins, which favours short samples: at most 2% of a job's are copied).",
)
@click.option("--endpoints", metavar="URL,URL", help="Servers not run by mvllmd (with or without /v1).")
@click.option("--api-key", envvar="MVLLM_ENDPOINT_API_KEY", help="For --endpoints servers. [$MVLLM_ENDPOINT_API_KEY]")
@click.option(
    "--wait-for-instances", type=click.FloatRange(0), default=0, metavar="SECONDS", help="Queue until one is READY."
)
@click.option("--on-error", type=click.Choice(sorted(ON_ERROR)), default="record", show_default=True)
@click.option("--resume", is_flag=True, help="Finish an existing output or its parts (same arguments).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output and its parts.")
@sampling_options
@click.option("--wait", "-w", is_flag=True, help="Show progress until the job ends; exit 0 only if it succeeded.")
@json_option
@pass_ctl
def submit(ctl: Ctl, /, **options: Any) -> int:
    """Generate NUM_SAMPLES samples for every prompt in DATA, across the daemon's READY instances of the
    model (or --endpoints), into OUTPUT: one row per (prompt_index, sample_index), sorted, with the
    input's columns carried through.

    \b
    Examples:
      mvllmctl submit -d prompts.parquet -o rollouts.parquet -k 8 --max-tokens 1024 --wait
      mvllmctl submit -d chats.jsonl -o out.parquet --endpoints http://10.0.0.5:8000/v1,http://10.0.0.6:8000
    """
    if options["resume"] and options["overwrite"]:
        raise click.UsageError("--resume and --overwrite exclude each other")
    spec = job_spec(options)
    job = ctl.client.call(stub(ctl).SubmitJob, pb.SubmitJobRequest(spec=spec)).job
    click.echo(f"job {job.id}: {job.samples_total} samples ({job.samples_done} done) -> {job.output_path}", err=True)
    if not options["wait"]:
        if options["as_json"]:
            print_json(job)
        else:
            click.echo(job.id)
        return ExitStatus.SUCCESS
    return follow(ctl, job.id, options["as_json"])


def job_spec(options: dict[str, Any]) -> pb.JobSpec:
    sampling = pb.SamplingParams(
        max_tokens=options["max_tokens"],
        temperature=options["temperature"],
        top_p=options["top_p"],
        stop=list(options["stop"]),
        seed=options["seed"],
        logprobs=options["logprobs"],
        return_token_ids=options["return_token_ids"],
        extra_body_json=_extra_body(options["extra_body"]),
    )
    endpoints = [u.strip() for u in (options["endpoints"] or "").split(",") if u.strip()]
    return pb.JobSpec(
        input_path=str(options["data"].absolute()),
        output_path=str(options["output"].absolute()),
        prompt_column=options["prompt_column"],
        num_samples=options["num_samples"],
        model=options["model"] or "",
        sampling=sampling,
        policy=POLICIES[options["policy"]],
        max_concurrent=options["max_concurrent"] or 0,
        endpoints=endpoints,
        wait_for_instances_seconds=options["wait_for_instances"],
        on_error=ON_ERROR[options["on_error"]],
        resume=options["resume"],
        overwrite=options["overwrite"],
        endpoint_api_key=options["api_key"] or "",
        no_hedge=options["no_hedge"],
    )


def follow(ctl: Ctl, job_id: str, as_json: bool) -> int:
    """Watch a job to its end with a progress bar on stderr; print the summary; 0 if it succeeded.
    Ctrl-C detaches: the job goes on."""
    last = None
    try:
        with JobProgress() as bar:
            for response in ctl.client.stream(stub(ctl).WatchJob, pb.WatchJobRequest(id=job_id)):
                last = response.job
                bar.update(last)
    except KeyboardInterrupt:
        click.echo(
            f"\ndetached; job {job_id} goes on. Follow it: mvllmctl watch {job_id}   Stop it: mvllmctl cancel {job_id}",
            err=True,
        )
        return ExitStatus.INTERRUPTED
    if last is None or last.state not in ENDED:
        raise CtlError(
            f"mvllmd stopped before job {job_id} ended; it resumes when mvllmd starts again "
            f"(then: mvllmctl watch {job_id})",
            ExitStatus.FAILED,
        )
    if as_json:
        print_json(last)
    else:
        print_summary(last)
    return ExitStatus.SUCCESS if last.state == pb.JOB_STATE_SUCCEEDED else ExitStatus.FAILED


def print_summary(job: pb.Job) -> None:
    elapsed = _elapsed(job)
    rate = job.completion_tokens / elapsed if elapsed > 0 else 0.0
    print_fields(
        [
            ("job", job.id),
            ("state", state_name(job.state)),
            ("rows", f"{job.samples_done} of {job.samples_total}"),
            ("errors", str(job.errors)),
            ("tokens", f"{job.completion_tokens} ({rate:,.0f} tokens/s)"),
            ("elapsed", f"{elapsed:.1f}s" if elapsed < 60 else duration(elapsed)),
            ("output", job.output_path),
        ]
    )
    if job.message:
        click.echo(f"\n{job.message}")
    if job.endpoints:
        click.echo("")
        print_endpoints(job)


def print_endpoints(job: pb.Job) -> None:
    total = sum(e.completed for e in job.endpoints) or 1
    rows = [
        [e.instance or "-", e.url, str(e.inflight), str(e.completed), f"{100 * e.completed / total:.1f}%",
         str(e.completion_tokens), "out" if e.out else ""]
        for e in job.endpoints
    ]  # fmt: skip
    print_table(["INSTANCE", "URL", "INFLIGHT", "SAMPLES", "SHARE", "TOKENS", ""], rows)


def _elapsed(job: pb.Job) -> float:
    if not job.HasField("started_at"):
        return 0.0
    end = job.finished_at.ToNanoseconds() / 1e9 if job.HasField("finished_at") else time.time()
    return max(0.0, end - job.started_at.ToNanoseconds() / 1e9)


@click.command()
@click.option("--prune", is_flag=True, help="Remove ended jobs' records and the parts they left.")
@json_option
@pass_ctl
def jobs(ctl: Ctl, as_json: bool, prune: bool) -> None:
    """List the jobs in submission order: state, progress, output. --prune forgets ended ones."""
    if prune:
        done = ctl.client.call(stub(ctl).PruneJobs, pb.PruneJobsRequest())
        if as_json:
            print_json(done)
            return
        click.echo(f"removed {len(done.removed_ids)} job records and {len(done.removed_parts)} parts directories")
        return
    listing = ctl.client.call(stub(ctl).ListJobs, pb.ListJobsRequest())
    if as_json:
        print_json(listing)
        return
    if not listing.jobs:
        click.echo("no jobs; submit one with `mvllmctl submit --data IN --output OUT`", err=True)
        return
    rows = [
        [j.id, state_name(j.state), f"{j.samples_done}/{j.samples_total}", _percent(j), str(j.errors), j.model,
         j.output_path, j.message[:60]]
        for j in listing.jobs
    ]  # fmt: skip
    print_table(["ID", "STATE", "SAMPLES", "DONE", "ERRORS", "MODEL", "OUTPUT", "MESSAGE"], rows)


def _percent(job: pb.Job) -> str:
    return f"{100 * job.samples_done / job.samples_total:.0f}%" if job.samples_total else "-"


@click.command()
@click.argument("job_id", metavar="ID")
@json_option
@pass_ctl
def job(ctl: Ctl, job_id: str, as_json: bool) -> None:
    """Show one job: its progress, per-server counts, and what it was asked."""
    found = ctl.client.call(stub(ctl).GetJob, pb.GetJobRequest(id=job_id)).job
    if as_json:
        print_json(found)
        return
    print_summary(found)
    spec = found.spec
    policy = pb.Policy.Name(spec.policy).removeprefix("POLICY_").lower().replace("_", "-")
    click.echo("")
    print_fields(
        [
            ("input", spec.input_path),
            ("samples per prompt", str(spec.num_samples)),
            ("policy", policy + (", no hedging" if spec.no_hedge else "")),
            ("endpoints", ",".join(spec.endpoints) or "this daemon's instances"),
        ]
    )


@click.command()
@click.argument("job_id", metavar="ID")
@json_option
@pass_ctl
def watch(ctl: Ctl, job_id: str, as_json: bool) -> int:
    """Follow a job with a progress bar until it ends (Ctrl-C stops watching, not the job)."""
    return follow(ctl, job_id, as_json)


@click.command()
@click.argument("job_id", metavar="ID")
@json_option
@pass_ctl
def cancel(ctl: Ctl, job_id: str, as_json: bool) -> None:
    """Cancel a job. Requests in flight finish first; the finished samples are kept for --resume."""
    click.echo(f"cancelling job {job_id} (requests in flight may finish first)", err=True)
    done = ctl.client.call(stub(ctl).CancelJob, pb.CancelJobRequest(id=job_id), min_timeout_s=CANCEL_WAIT_S).job
    if as_json:
        print_json(done)
        return
    click.echo(f"job {done.id}: {state_name(done.state)}: {done.message}")
