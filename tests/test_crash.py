"""kill -9 in the middle of a plan: the database stays sound and holds nothing of the plan."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "cleveragents.cli"]
TRIALS = 10
SEED_ROWS = 100
# Enough rows per step that uncommitted pages spill into the WAL before the kill.
BATCH = 50_000
FOREVER = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


def _batch(plan: str, step: str) -> str:
    return (
        "INSERT INTO t (plan, v) WITH RECURSIVE c(x) AS "
        f"(SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT {BATCH}) "
        f"SELECT '{plan}', x FROM c -- {step}"
    )


def _write_plans(folder: Path, trial: int) -> tuple[Path, Path]:
    """A small plan that commits three rows, and a big one that never ends."""
    head = "resources:\n  db: {kind: database, engine: sqlite, location: crash.db}\nsteps:\n"
    keep = folder / f"keep-{trial}.yaml"
    rows = [f"INSERT INTO t VALUES ('keep-{trial}', {i})" for i in range(3)]
    keep.write_text(
        f"id: keep-{trial}\n{head}"
        + "".join(
            f'  - {{id: row-{i}, resource: db, sql: "{sql}"}}\n' for i, sql in enumerate(rows)
        ),
        encoding="utf-8",
    )
    crash = folder / f"crash-{trial}.yaml"
    batches = [_batch(f"crash-{trial}", str(i)) for i in range(3)]
    crash.write_text(
        f"id: crash-{trial}\n{head}"
        + "".join(
            f'  - {{id: batch-{i}, resource: db, checkpoint: true, sql: "{sql}"}}\n'
            for i, sql in enumerate(batches)
        )
        + f'  - {{id: forever, resource: db, sql: "{FOREVER}"}}\n',
        encoding="utf-8",
    )
    return keep, crash


def _holds_write_lock(db: Path) -> bool:
    probe = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            return True
        raise
    finally:
        probe.close()


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """A WAL database holding SEED_ROWS committed rows."""
    db = tmp_path / "crash.db"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = wal")
        conn.execute("CREATE TABLE t (plan TEXT NOT NULL, v INT NOT NULL)")
        conn.executemany("INSERT INTO t VALUES ('seed', ?)", [(i,) for i in range(SEED_ROWS)])
    finally:
        conn.close()
    return db


def test_kill_9_mid_plan_leaves_the_database_sound_over_repeated_trials(
    tmp_path: Path, database: Path
) -> None:
    rng = random.Random(20240611)
    for trial in range(TRIALS):
        keep, crash = _write_plans(tmp_path, trial)
        with subprocess.Popen(
            [*CLI, "run", str(keep), str(crash)],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        ) as process:
            deadline = time.monotonic() + 20
            while not _holds_write_lock(database):
                assert process.poll() is None, f"trial {trial}: exited early: {process.stderr}"
                assert time.monotonic() < deadline, f"trial {trial}: no plan took the lock"
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.4))
            process.kill()
            process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL

        conn = sqlite3.connect(database)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], trial
            counts = dict(conn.execute("SELECT plan, count(*) FROM t GROUP BY plan").fetchall())
        finally:
            conn.close()
        assert counts.pop("seed") == SEED_ROWS, trial
        assert f"crash-{trial}" not in counts, f"trial {trial}: the killed plan left rows"
        # Every earlier small plan is all there or not there at all, never in part.
        assert set(counts.values()) <= {3}, (trial, counts)
        assert set(counts) <= {f"keep-{i}" for i in range(trial + 1)}, (trial, counts)
