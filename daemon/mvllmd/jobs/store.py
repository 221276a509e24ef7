"""Job records (`mvllm.jobs.JobRecord`) in SQLite (`STATE_DIR/jobs.sqlite3`): what survives a restart
or a kill -9.

The parts directory beside each output is the truth about which samples are done; the counts kept
here are what `jobs` shows, written at most every PROGRESS_EVERY_S while a job runs and at each
change of state. WAL mode: a crash loses at most the last unsynced progress count, never a record.
The `request` column holds the spec's JSON (`JobSpec.to_json`; the previous release's form loads too).
A write that fails (the state directory full, or read-only) raises OutOfSpace or StorageError naming
the directory; what to do about it is the caller's (jobs/manager.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mvllm.jobs import JobRecord, JobSpec, JobState
from mvllmd.errors import OutOfSpace, StorageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    samples_total INTEGER NOT NULL,
    samples_done INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    message TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL
)
"""
SAVE = """
INSERT INTO jobs (seq, id, request, state, samples_total, samples_done, errors, completion_tokens, message,
                  created_at, started_at, finished_at)
VALUES ((SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET
    request = excluded.request, state = excluded.state, samples_total = excluded.samples_total,
    samples_done = excluded.samples_done, errors = excluded.errors, completion_tokens = excluded.completion_tokens,
    message = excluded.message, started_at = excluded.started_at, finished_at = excluded.finished_at
"""


class JobStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: each write is its own transaction
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)
        path.chmod(0o600)

    def close(self) -> None:
        self._db.close()

    def save(self, job: JobRecord) -> None:
        self._write(
            SAVE,
            (
                job.id,
                job.spec.to_json(),
                job.state.value,
                job.samples_total,
                job.samples_done,
                job.errors,
                job.completion_tokens,
                job.message,
                job.created_at,
                job.started_at,
                job.finished_at,
            ),
        )

    def load(self) -> list[JobRecord]:
        """Every record, oldest first."""
        rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        return [_record(row) for row in rows]

    def delete(self, job_id: str) -> None:
        self._write("DELETE FROM jobs WHERE id = ?", (job_id,))

    def _write(self, sql: str, values: tuple[object, ...]) -> None:
        try:
            self._db.execute(sql, values)
        except sqlite3.Error as exc:
            folder = self.path.parent
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise OutOfSpace(f"the state directory {folder} is full ({exc}): free space there") from None
            raise StorageError(f"cannot write the job records in {folder}: {exc}") from None


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        spec=JobSpec.from_json(row["request"]),
        state=JobState(row["state"]),
        samples_total=row["samples_total"],
        samples_done=row["samples_done"],
        errors=row["errors"],
        completion_tokens=row["completion_tokens"],
        message=row["message"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )
