"""`mvllmctl submit | jobs | job | watch | cancel`: rollout jobs, from a prompt file to one parquet file."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from mvllm.convert import spec_from_proto, spec_to_proto, state_from_proto
from mvllm.jobs import InvalidSpec, JobSpec, OnError, Policy, Sampling, extra_body_from_json, validate
from mvllm.v1 import job_pb2 as pb
from mvllm.v1 import job_pb2_grpc
from mvllmctl.client import CtlError, StreamCut
from mvllmctl.context import Ctl, json_option, pass_ctl
from mvllmctl.exit_codes import ExitStatus
from mvllmctl.output import duration, print_fields, print_json, print_table
from mvllmctl.progress import JobProgress

CANCEL_WAIT_S = 120.0  # a cancel lets requests in flight finish first
SAMPLING_VALUES = ("max_tokens", "temperature", "top_p", "seed", "logprobs")  # flags that default to None


def state_name(value: int) -> str:
    return pb.JobState.Name(value).removeprefix("JOB_STATE_")


def stub(ctl: Ctl) -> job_pb2_grpc.JobServiceStub:
    return job_pb2_grpc.JobServiceStub(ctl.client.channel())


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """A job spec that fails mvllm.jobs.validate is a usage error (exit 2), its message as is: the
    daemon would refuse it with the same words."""
    try:
        yield
    except InvalidSpec as exc:
        raise CtlError(str(exc), ExitStatus.USAGE) from None


def sampling_options(f: Any) -> Any:
    """The sampling flags, shared by `submit` and nothing else (generate-rollouts keeps the seed's).
    Their ranges are checked by mvllm.jobs.validate, as the daemon checks them."""
    options = [
        click.option(
            "--max-tokens",
            type=int,
            help="Per sample, 1 or more. At most 64, with no --seed, text prompts go several to a request "
            "to each server, which costs less a sample. [the server's default]",
        ),
        click.option("--temperature", type=float, help="From 0 to 100. [1.0]"),
        click.option("--top-p", type=float, help="Above 0, at most 1. [1.0]"),
        click.option("--stop", multiple=True, metavar="TEXT", help="Stop string (repeatable)."),
        click.option("--seed", type=int, help="Reproducible samples, from 0 to 2**63-1. [no seed sent]"),
        click.option("--extra-body", metavar="JSON", help="Merged into each request, e.g. '{\"top_k\": 20}'."),
        click.option("--logprobs", type=int, metavar="N", help="Add the top-N token logprobs (N at most 20)."),
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
@click.option("--num-samples", "-k", type=int, default=1, show_default=True, help="Samples per prompt, below 65536.")
@click.option("--model", "-m", help="The served model. [the only one served]")
@click.option("--prompt-column", default="prompt", show_default=True, help="String or list of {role, content}.")
@click.option("--max-concurrent", type=int, help="Samples in flight at most. [daemon's, 1024]")
@click.option(
    "--policy", type=click.Choice([p.value for p in Policy]), default=Policy.LEAST_LOADED.value, show_default=True
)
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
@click.option("--wait-for-instances", type=float, default=0, metavar="SECONDS", help="Queue until one is READY.")
@click.option(
    "--on-error", type=click.Choice([e.value for e in OnError]), default=OnError.RECORD.value, show_default=True
)
@click.option(
    "--weight-version",
    metavar="V",
    help="Only servers at this version of the weights (after `mvllmctl weights update`) take the job's work;"
    " the others wait, or join once updated. [any]",
)
@click.option(
    "--shard",
    metavar="K/N",
    callback=lambda ctx, param, value: _shard(value),
    help="Only every N-th prompt from the K-th (0-based), for N jobs (on N coordinators) that split one input;"
    " rows keep their prompt_index in the whole input. [all]",
)
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
    spec = spec_to_proto(job_spec(options), with_api_key=True)
    job = ctl.client.call(stub(ctl).SubmitJob, pb.SubmitJobRequest(spec=spec)).job
    click.echo(f"job {job.id}: {job.samples_total} samples ({job.samples_done} done) -> {job.output_path}", err=True)
    if not options["wait"]:
        if options["as_json"]:
            print_json(job)
        else:
            click.echo(job.id)
        return ExitStatus.SUCCESS
    return follow(ctl, job.id, options["as_json"])


def job_spec(options: dict[str, Any]) -> JobSpec:
    """`submit`'s flags as a job spec, validated (a usage error says what to change)."""
    endpoints = [u.strip() for u in (options["endpoints"] or "").split(",") if u.strip()]
    given = {k: options[k] for k in SAMPLING_VALUES if options[k] is not None}  # the rest: the model's defaults
    with usage_errors():
        sampling = Sampling(
            stop=tuple(options["stop"]),
            return_token_ids=options["return_token_ids"],
            extra_body=extra_body_from_json(options["extra_body"] or ""),
            **given,
        )
        return validate(
            JobSpec(
                input_path=options["data"].absolute(),
                output_path=options["output"].absolute(),
                prompt_column=options["prompt_column"],
                num_samples=options["num_samples"],
                model=options["model"] or "",
                sampling=sampling,
                policy=Policy(options["policy"]),
                max_concurrent=options["max_concurrent"] or 0,
                endpoints=tuple(endpoints),
                wait_for_instances_s=options["wait_for_instances"],
                on_error=OnError(options["on_error"]),
                resume=options["resume"],
                overwrite=options["overwrite"],
                endpoint_api_key=options["api_key"] or "",
                hedge=not options["no_hedge"],
                weight_version=options["weight_version"] or "",
                shard_index=options["shard"][0],
                shard_count=options["shard"][1],
            )
        )


def _shard(value: str | None) -> tuple[int, int]:
    if value is None:
        return 0, 1
    index, sep, count = value.partition("/")
    if not sep or not index.isdigit() or not count.isdigit():
        raise click.BadParameter(f"{value!r}: expected K/N, e.g. 0/4 (the first of four shards)", param_hint="--shard")
    return int(index), int(count)


def follow(ctl: Ctl, job_id: str, as_json: bool) -> int:
    """Watch a job to its end with a progress bar on stderr; print the summary; 0 if it succeeded.
    Ctrl-C detaches: the job goes on."""
    last, cut = None, ""
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
    except StreamCut as exc:  # mvllmd stopped or was killed after the watch began: the job resumes when it starts
        cut = f" ({exc})"
    if last is None or not _ended(last):
        raise CtlError(
            f"mvllmd stopped before job {job_id} ended{cut}; it resumes when mvllmd starts again "
            f"(then: mvllmctl watch {job_id})",
            ExitStatus.FAILED,
        )
    if as_json:
        print_json(last)
    else:
        print_summary(last)
    return ExitStatus.SUCCESS if last.state == pb.JOB_STATE_SUCCEEDED else ExitStatus.FAILED


def _ended(job: pb.Job) -> bool:
    state = state_from_proto(job.state)
    return state is not None and state.ended


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
    spec = spec_from_proto(found.spec)
    click.echo("")
    print_fields(
        [
            ("input", str(spec.input_path)),
            ("samples per prompt", str(spec.num_samples)),
            ("policy", spec.policy.value + ("" if spec.hedge else ", no hedging")),
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
