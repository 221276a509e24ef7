"""A whole job against real (simulated) servers: parquet in, one sorted parquet out; stop and resume."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvllm.jobs import JobSpec, Policy, Sampling
from mvllmd.dispatch.endpoints import Endpoints, Tuning
from mvllmd.errors import Conflict, InvalidRequest
from mvllmd.jobs.output import parts_dir
from mvllmd.jobs.prepare import Prepared, fingerprint, prepare
from mvllmd.jobs.run import Progress, Run
from mvllmd.jobs.sources import UrlSource
from mvllmd.jobs.targets import Target

from simkit import SimProcess, StartSim

N, K = 300, 3


def make_input(tmp: Path) -> Path:
    path = tmp / "prompts.parquet"
    if path.exists():
        return path  # the same file: a rewrite would change its time, and a resume would be refused
    pq.write_table(pa.table({"prompt": [f"question {i}" for i in range(N)], "id": list(range(N))}), path)
    return path


def spec(tmp: Path, **kw: object) -> JobSpec:
    base: dict[str, object] = {
        "input_path": make_input(tmp),
        "output_path": tmp / "out.parquet",
        "model": "sim",
        "sampling": Sampling(max_tokens=8, seed=3),
        "num_samples": K,
        "max_concurrent": 128,
    }
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


async def endpoints(start_sim: StartSim, n: int = 2) -> list[Target]:
    return [Target((await start_sim("--time-scale", "0.001"))[0], capacity=64) for _ in range(n)]


async def run_job(
    prepared: Prepared,
    targets: list[Target],
    stop: asyncio.Event,
    *,
    on_progress: Callable[[Progress], None] = lambda p: None,
    hang_timeout_s: float = 60.0,
    stop_drain_s: float = 30.0,
    flush_age_s: float = 5.0,
) -> Progress:
    """A run over servers named by URL, as the daemon makes one."""
    table = Endpoints(Tuning(hang_timeout_s=hang_timeout_s))
    try:
        run = Run(prepared, UrlSource(targets), table, stop, stop_drain_s=stop_drain_s, on_progress=on_progress,
                  flush_age_s=flush_age_s)  # fmt: skip
        return await run.run()
    finally:
        await table.close()


async def test_a_job_end_to_end(start_sim: StartSim, tmp_path: Path) -> None:
    job = spec(tmp_path)
    progress = await run_job(prepare(job), await endpoints(start_sim), asyncio.Event())
    assert (progress.samples_done, progress.errors) == (N * K, 0)
    table = pq.read_table(job.output_path)
    assert table.num_rows == N * K
    keys = list(zip(table.column("prompt_index").to_pylist(), table.column("sample_index").to_pylist(), strict=True))
    assert keys == [(p, s) for p in range(N) for s in range(K)]  # sorted, each pair once
    assert table.column("id").to_pylist()[: K + 1] == [0, 0, 0, 1]  # input columns carried through
    assert table.column("seed").null_count == 0  # --seed given: every sample's seed is recorded
    assert b"mvllm.job" in table.schema.metadata
    assert not parts_dir(job.output_path).exists()


async def test_stop_then_resume_redoes_only_what_is_missing(start_sim: StartSim, tmp_path: Path) -> None:
    urls = await endpoints(start_sim)
    stop = asyncio.Event()

    def stop_halfway(progress: Progress) -> None:
        if progress.samples_done >= N * K // 2:
            stop.set()

    first = await run_job(prepare(spec(tmp_path)), urls, stop, on_progress=stop_halfway)
    assert N * K // 2 <= first.samples_done < N * K
    assert not (tmp_path / "out.parquet").exists()  # nothing half-written is presented as complete
    assert list(parts_dir(tmp_path / "out.parquet").glob("part-*.parquet"))
    with pytest.raises(Conflict, match="holds an unfinished run"):
        prepare(spec(tmp_path))
    with pytest.raises(Conflict, match="num_samples differ"):
        prepare(spec(tmp_path, num_samples=4, resume=True))
    source = tmp_path / "prompts.parquet"
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the input touched since
    with pytest.raises(Conflict, match=r"the input file \(its size or time\) differ"):
        prepare(spec(tmp_path, resume=True))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    resumed = prepare(spec(tmp_path, resume=True))
    assert resumed.done.count == first.samples_done
    second = await run_job(resumed, urls, asyncio.Event())
    assert second.samples_done == N * K
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == N * K
    assert (
        len(set(zip(table.column("prompt_index").to_pylist(), table.column("sample_index").to_pylist(), strict=True)))
        == N * K
    )


async def test_samples_are_on_disk_soon_even_when_the_job_stalls(start_sim: StartSim, tmp_path: Path) -> None:
    # The server answers 5 requests and then hangs: no sample arrives after those to trigger a write.
    base, _ = await start_sim("--time-scale", "0", "--hang-after-requests", "5")
    job = spec(tmp_path, max_concurrent=8)
    seen: list[int] = []
    stop = asyncio.Event()
    running = asyncio.create_task(run_job(prepare(job), [Target(base, capacity=8)], stop, hang_timeout_s=600,
                                          on_progress=lambda p: seen.append(p.samples_done),
                                          stop_drain_s=0.1, flush_age_s=0.2))  # fmt: skip

    def written() -> int:
        return sum(pq.read_metadata(p).num_rows for p in parts_dir(job.output_path).glob("part-*.parquet"))

    try:
        for _ in range(200):  # up to 10 s; the age limit is 0.2 s
            if seen and written() == seen[-1] > 0:
                break
            await asyncio.sleep(0.05)
        assert seen and written() == seen[-1] > 0  # every answered sample is in a part ...
        assert not running.done()  # ... while the job is still stalled: no later sample made it so
    finally:
        stop.set()
        await running


async def test_a_jsonl_input_of_many_batches(start_sim: StartSim, tmp_path: Path) -> None:
    # More rows than one input batch (4,096), with a field that appears only after the first batch
    # and one whose ints become floats: assembly joins every batch's columns onto the output.
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"question {i}", "score": i} for i in range(5000)]
    rows[4500].update(score=0.5, note="late")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = spec(tmp_path, input_path=data, num_samples=1)
    progress = await run_job(prepare(job), await endpoints(start_sim), asyncio.Event())
    assert (progress.samples_done, progress.errors) == (5000, 0)
    table = pq.read_table(job.output_path)
    assert table.num_rows == 5000
    assert table.column("score").to_pylist()[4499:4502] == [4499.0, 0.5, 4501.0]
    assert table.column("note").to_pylist()[4500] == "late" and table.column("note").null_count == 4999


async def test_refusals_before_anything_is_sent(tmp_path: Path) -> None:
    job = spec(tmp_path)
    with pytest.raises(InvalidRequest, match="is the input"):
        prepare(spec(tmp_path, output_path=job.input_path))
    with pytest.raises(InvalidRequest, match="nowhere is not a directory"):
        prepare(spec(tmp_path, output_path=tmp_path / "nowhere" / "out.parquet"))
    with pytest.raises(InvalidRequest, match="cannot write the output in /proc"):  # root may write anywhere but here
        prepare(spec(tmp_path, output_path=Path("/proc/out.parquet")))
    job.output_path.write_bytes(b"an earlier result")
    with pytest.raises(Conflict, match="exists; pass --resume"):
        prepare(job)
    assert job.output_path.read_bytes() == b"an earlier result"  # never touched
    assert pq.read_table(job.input_path).num_rows == N  # nor is the input


async def test_overwrite_replaces_an_output_and_stale_parts(start_sim: StartSim, tmp_path: Path) -> None:
    job = spec(tmp_path, overwrite=True)
    job.output_path.write_bytes(b"an earlier result")
    stale = parts_dir(job.output_path)
    stale.mkdir()
    (stale / "part-000001.parquet").write_bytes(b"not even parquet")
    (stale / "journal.jsonl").write_text('[0, 0, "a sample of another run"]\n')
    progress = await run_job(prepare(job), await endpoints(start_sim), asyncio.Event())
    assert progress.samples_done == N * K
    table = pq.read_table(job.output_path)
    assert table.num_rows == N * K and "another run" not in table.column("response").to_pylist()
    assert not stale.exists()


async def test_a_finished_output_resumed_with_other_arguments_is_refused(start_sim: StartSim, tmp_path: Path) -> None:
    job = spec(tmp_path)
    await run_job(prepare(job), await endpoints(start_sim), asyncio.Event())
    assert prepare(spec(tmp_path, resume=True)).complete  # the same job: nothing to do
    with pytest.raises(Conflict, match="was written by a different job; pass --overwrite"):
        prepare(spec(tmp_path, resume=True, num_samples=K + 1))
    assert pq.read_table(job.output_path).num_rows == N * K  # untouched


async def test_on_error_fail_stops_the_job(start_sim: StartSim, tmp_path: Path) -> None:
    base, _ = await start_sim("--time-scale", "0", "--max-model-len", "16")
    job = spec(tmp_path, sampling=Sampling(max_tokens=20), on_error="fail")
    progress = await run_job(prepare(job), [Target(base, capacity=16)], asyncio.Event())
    assert progress.failed.startswith("prompt ") and "HTTP 400" in progress.failed
    assert not job.output_path.exists()


async def test_many_instant_answers_all_land(sim_process: Callable[..., SimProcess], tmp_path: Path) -> None:
    # Fed with backpressure and hedged in the tail, some twins are cancelled before their task ever
    # runs: none may stay "in flight", or the job never ends.
    data = tmp_path / "many.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(5000)]}), data)
    sims = [sim_process("--time-scale", "0") for _ in range(2)]  # processes: the timing of real servers
    for sim in sims:
        sim.wait_listening()
    urls = [Target(sim.url, capacity=1024) for sim in sims]
    job = JobSpec(data, tmp_path / "many.out.parquet", model="sim", sampling=Sampling(max_tokens=8), max_concurrent=256)
    progress = await asyncio.wait_for(run_job(prepare(job), urls, asyncio.Event()), timeout=120)
    assert progress.samples_done == 5000


def test_prepare_refuses_what_validate_refuses(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"^--num-samples must be from 1 to 65535, got 0$"):
        prepare(spec(tmp_path, num_samples=0))


def fixed_input(tmp: Path) -> Path:
    data = tmp / "in.parquet"
    data.write_bytes(b"x" * 10)
    os.utime(data, ns=(1_700_000_000_000_000_000, 1_700_000_000_123_456_789))
    return data


def previous_release_job(tmp: Path) -> JobSpec:
    sampling = Sampling(max_tokens=7, stop=("\n\n",), seed=3, extra_body={"top_k": 20})
    return JobSpec(fixed_input(tmp), tmp / "out.parquet", num_samples=4, model="m", sampling=sampling,
                   policy=Policy.ROUND_ROBIN, max_concurrent=64, hedge=False)  # fmt: skip


def test_the_fingerprint_is_the_previous_releases(tmp_path: Path) -> None:
    # The manifest beside the parts and the output's "mvllm.job" metadata: a job that the previous
    # release started must resume, so the JSON stays as it was, key for key and in this order, with
    # the model inside "sampling" (where the previous release kept it).
    job = previous_release_job(tmp_path)
    expected = {
        "input": str(tmp_path / "in.parquet"),
        "input_size_mtime": [10, 1_700_000_000_123_456_789],
        "prompt_column": "prompt",
        "num_samples": 4,
        "sampling": {
            "model": "m",
            "max_tokens": 7,
            "temperature": 1.0,
            "top_p": 1.0,
            "stop": ["\n\n"],
            "seed": 3,
            "logprobs": None,
            "return_token_ids": False,
            "extra_body": {"top_k": 20},
        },
        "policy": "round-robin",
    }
    assert json.dumps(fingerprint(job)) == json.dumps(expected)
    assert json.dumps(fingerprint(job)) == (  # as the previous release wrote it
        f'{{"input": "{tmp_path}/in.parquet", "input_size_mtime": [10, 1700000000123456789], "prompt_column": '
        '"prompt", "num_samples": 4, "sampling": {"model": "m", "max_tokens": 7, "temperature": 1.0, "top_p": 1.0, '
        '"stop": ["\\n\\n"], "seed": 3, "logprobs": null, "return_token_ids": false, "extra_body": {"top_k": 20}}, '
        '"policy": "round-robin"}'
    )


def test_parts_left_by_the_previous_release_resume(tmp_path: Path) -> None:
    job = previous_release_job(tmp_path)
    pq.write_table(pa.table({"prompt": ["a", "b"]}), job.input_path)
    os.utime(job.input_path, ns=(1_700_000_000_000_000_000, 1_700_000_000_123_456_789))
    size = job.input_path.stat().st_size
    parts = parts_dir(job.output_path)
    parts.mkdir()
    (parts / "manifest.json").write_text(  # the previous release's manifest.json for this job
        "{\n"
        f'  "input": "{tmp_path}/in.parquet",\n'
        f'  "input_size_mtime": [\n    {size},\n    1700000000123456789\n  ],\n'
        '  "prompt_column": "prompt",\n  "num_samples": 4,\n  "sampling": {\n    "model": "m",\n'
        '    "max_tokens": 7,\n    "temperature": 1.0,\n    "top_p": 1.0,\n    "stop": [\n      "\\n\\n"\n    ],\n'
        '    "seed": 3,\n    "logprobs": null,\n    "return_token_ids": false,\n    "extra_body": {\n'
        '      "top_k": 20\n    }\n  },\n  "policy": "round-robin"\n}'
    )
    assert (parts / "manifest.json").read_text() == json.dumps(fingerprint(job), indent=2)  # what this one writes
    assert prepare(replace(job, resume=True)).samples_total == 2 * 4
