"""SIGINT/SIGTERM during ``cleveragents run``: statement interrupted, plans rolled back, 130/143."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest

from cleveragents import cli, runtime
from cleveragents.hookspecs import hookimpl
from cleveragents.plugins import get_plugin_manager
from cleveragents.tools import ToolContext, ToolRegistry

CLI = [sys.executable, "-m", "cleveragents.cli"]
# Never ends on its own: only an interrupt stops it.
FOREVER = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
# Generous upper bound for liveness; the run normally ends well under a second after the signal.
EXIT_WITHIN = 10.0


def _plan(folder: Path, name: str, *, rows: int = 1, location: str = "run.db") -> Path:
    """Write a plan that creates a table, inserts *rows* rows, then runs FOREVER."""
    inserts = "".join(
        f"  - id: insert-{i}\n    resource: db\n    sql: INSERT INTO t VALUES ({i})\n"
        for i in range(rows)
    )
    path = folder / f"{name}.yaml"
    path.write_text(
        f"id: {name}\n"
        "resources:\n"
        f"  db: {{kind: database, engine: sqlite, location: {location}}}\n"
        "steps:\n"
        "  - id: schema\n    resource: db\n    sql: CREATE TABLE IF NOT EXISTS t (v INT)\n"
        f"{inserts}"
        "  - id: forever\n    resource: db\n    checkpoint: true\n"
        f"    sql: {FOREVER}\n",
        encoding="utf-8",
    )
    return path


def _wait_for_write_lock(db: Path, process: subprocess.Popen[str], timeout: float = 20) -> None:
    """Return once a plan holds the write lock on *db* (its transaction is open)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"cleveragents exited early: {process.communicate()}")
        if db.exists():
            probe = sqlite3.connect(db, timeout=0, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc):
                    return
                raise
            finally:
                probe.close()
        time.sleep(0.02)
    raise AssertionError(f"no plan took the write lock on {db} within {timeout}s")


def _check_rolled_back(db: Path) -> None:
    """Assert the database is sound and holds nothing of the interrupted plans."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        tables = conn.execute("SELECT name FROM sqlite_master WHERE name = 't'").fetchall()
        assert tables == [], "the interrupted plan's table survived"
    finally:
        conn.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_interrupts_the_running_statement_and_rolls_the_plan_back(
    tmp_path: Path, signum: signal.Signals
) -> None:
    plan = _plan(tmp_path, "long", rows=3)
    db = tmp_path / "run.db"
    with subprocess.Popen(
        [*CLI, "run", str(plan)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        _wait_for_write_lock(db, process)
        time.sleep(0.2)  # well inside the endless statement by now
        sent = time.monotonic()
        process.send_signal(signum)
        out, err = process.communicate(timeout=EXIT_WITHIN)
        took = time.monotonic() - sent
    assert process.returncode == 128 + signum, (out, err)
    assert took < EXIT_WITHIN
    assert err.splitlines() == [
        f"cleveragents: interrupted by {signum.name}; open plans were rolled back"
    ]
    assert "Traceback" not in out + err
    assert "interrupted by" in out  # the plan's row in the table names why it failed
    _check_rolled_back(db)


def test_a_signal_rolls_back_every_open_plan_and_skips_the_waiting_ones(tmp_path: Path) -> None:
    # Three plans on three files run at once; the fourth waits for a free worker.
    plans = [_plan(tmp_path, f"p{i}", location=f"p{i}.db") for i in range(4)]
    with subprocess.Popen(
        [*CLI, "run", "--parallel", "3", "--json", *map(str, plans)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        for i in range(3):
            _wait_for_write_lock(tmp_path / f"p{i}.db", process)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=EXIT_WITHIN)
    assert process.returncode == 143, (out, err)
    assert "Traceback" not in out + err
    assert len(err.splitlines()) == 1
    import json

    results = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["plan"] for r in results) == ["p0", "p1", "p2", "p3"]
    assert all(r["status"] == "failed" for r in results)
    assert all("interrupted by SIGTERM" in r["error"] for r in results)
    for i in range(3):
        _check_rolled_back(tmp_path / f"p{i}.db")
    assert not (tmp_path / "p3.db").exists(), "the plan that never started touched its database"


# -- a statement that starts just after the signal ------------------------------------


class _LateStatement:
    """A tool that lets the signal arrive first, then starts an endless statement."""

    def __init__(self) -> None:
        self.conn: Any = None
        self.watchdog_fired = False

    @hookimpl
    def cleveragents_register_tools(self, registry: ToolRegistry) -> None:
        registry.add("signal_then_query", self.signal_then_query)

    def signal_then_query(self, ctx: ToolContext) -> None:
        with ctx.connection("db") as conn:
            conn.execute("INSERT INTO t VALUES (1)")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the main thread has handled the signal by now
            self.conn = conn
            conn.execute(FOREVER).fetchall()


@pytest.fixture
def late_statement(monkeypatch: pytest.MonkeyPatch) -> Iterator[_LateStatement]:
    tool = _LateStatement()

    def plugin_manager() -> pluggy.PluginManager:
        pm = get_plugin_manager()
        pm.register(tool, name="late-statement")
        return pm

    monkeypatch.setattr(runtime, "get_plugin_manager", plugin_manager)

    def watchdog() -> None:
        # Only so a regression fails instead of hanging: the CLI must stop it first.
        if not stop.wait(EXIT_WITHIN) and tool.conn is not None:
            tool.watchdog_fired = True
            tool.conn.interrupt()

    stop = threading.Event()
    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    yield tool
    stop.set()
    thread.join()


def test_a_statement_started_after_the_signal_is_interrupted_too(
    tmp_path: Path,
    late_statement: _LateStatement,
    capsys: pytest.CaptureFixture[str],
) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    plan = tmp_path / "late.yaml"
    plan.write_text(
        "id: late\n"
        "resources:\n"
        "  db: {kind: database, engine: sqlite, location: late.db}\n"
        "steps:\n"
        "  - {id: schema, resource: db, sql: CREATE TABLE t (v INT)}\n"
        "  - {id: late, tool: signal_then_query}\n",
        encoding="utf-8",
    )
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", str(plan)])
    assert exited.value.code == 143
    assert not late_statement.watchdog_fired, "the statement ran until the watchdog stopped it"
    assert signal.getsignal(signal.SIGTERM) == previous
    err = capsys.readouterr().err
    assert err.splitlines() == ["cleveragents: interrupted by SIGTERM; open plans were rolled back"]
    _check_rolled_back(tmp_path / "late.db")
