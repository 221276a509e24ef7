"""Upgrades: a state directory the previous release wrote loads, and its job cut short resumes and
finishes exactly once.

The fixture (tests/fixtures/state-f7675d0, see its README) is what release f7675d0 left after kill -9
in the middle of a job: the job's record in that release's JSON, an instance spec with a dead process,
parts and a journal holding 56 of 80 samples (the record, saved each second, said 50). It is copied
here, and its paths (and the input's mtime, which the manifest records) are moved to this test's
directory; nothing else is changed, but the instance's simulated speed (--time-scale 3 becomes 0.01,
for a quick test) and its port (a free one).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import pyarrow.parquet as pq

from daemonkit import Spawn, free_port_range, instance_status, wait_for
from jobkit import assert_each_pair_once, wait_ended

FIXTURE = Path(__file__).parent / "fixtures" / "state-f7675d0"
OLD_ROOT = "/tmp/fx"
JOB_ID = "4c4e272923e4"
PROMPTS, SAMPLES, DONE_BEFORE = 40, 2, 56  # the record said 50: it was saved each second, the journal at once


def install_fixture(root: Path) -> None:
    shutil.copytree(FIXTURE / "state", root / "state")
    shutil.copytree(FIXTURE / "work", root / "work")
    with sqlite3.connect(root / "state" / "jobs.sqlite3") as db:
        db.execute("UPDATE jobs SET request = replace(request, ?, ?)", (OLD_ROOT, str(root)))
    db.close()
    parts = root / "work" / "out.parquet.parts"
    manifest = json.loads((parts / "manifest.json").read_text())
    manifest["input"] = manifest["input"].replace(OLD_ROOT, str(root))
    (parts / "manifest.json").write_text(json.dumps(manifest, indent=2))
    size, mtime_ns = manifest["input_size_mtime"]
    assert (root / "work" / "prompts.parquet").stat().st_size == size
    os.utime(root / "work" / "prompts.parquet", ns=(mtime_ns, mtime_ns))
    spec_file = root / "state" / "instances" / "fx-0.json"
    spec = json.loads(spec_file.read_text())
    port = free_port_range(1)
    argv = [str(a) for a in spec["argv"]]
    argv[0] = sys.executable
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--time-scale") + 1] = "0.01"
    spec.update(argv=argv, port=port, log_path=spec["log_path"].replace(OLD_ROOT, str(root)))
    spec_file.write_text(json.dumps(spec, indent=2))


def journal_samples(parts: Path) -> dict[tuple[int, int], str]:
    """What the previous release had finished: (prompt, sample) -> response, from its part and journal."""
    done = {}
    for part in parts.glob("part-*.parquet"):
        table = pq.read_table(part, columns=["prompt_index", "sample_index", "response"]).to_pylist()
        done.update({(r["prompt_index"], r["sample_index"]): r["response"] for r in table})
    for line in (parts / "journal.jsonl").read_text().splitlines():
        row = json.loads(line)
        done[(row[0], row[1])] = row[2]
    return done


def test_a_job_cut_short_by_the_previous_release_finishes_exactly_once(short_tmp: Path, spawn: Spawn) -> None:
    install_fixture(short_tmp)
    finished_before = journal_samples(short_tmp / "work" / "out.parquet.parts")
    assert len(finished_before) == DONE_BEFORE
    daemon = spawn(["--listen", f"unix:{short_tmp}/m.sock", "--state-dir", str(short_tmp / "state"),
                    "--unit-manager", "process", "--sim-gpus", "2"])  # fmt: skip
    wait_for(lambda: [i["state"] for i in instance_status(daemon.ctl)] == ["INSTANCE_STATE_READY"], 60)
    job = wait_ended(daemon, JOB_ID)
    assert job["state"] == "JOB_STATE_SUCCEEDED", job
    assert job["spec"]["model"] == "m" and job["spec"]["num_samples"] == SAMPLES  # the old record, read
    table = pq.read_table(short_tmp / "work" / "out.parquet")
    assert_each_pair_once(table, PROMPTS, SAMPLES)
    rows = table.select(["prompt_index", "sample_index", "response", "error"]).to_pylist()
    assert all(r["error"] is None for r in rows)
    kept = {(r["prompt_index"], r["sample_index"]): r["response"] for r in rows}
    assert all(kept[key] == response for key, response in finished_before.items())  # not asked for again
    assert not (short_tmp / "work" / "out.parquet.parts").exists()
