"""The PostgreSQL engine against a real server (CLEVERAGENTS_TEST_PG_DSN; skipped without it).

Start a throwaway server with ``eval "$(scripts/pg-test-server start)"``. Each
test works in its own schema (``search_path`` set through the DSN's
``options``), checked through a separate psycopg connection.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import eventually
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleveragents.errors import (
    CheckpointExpiredError,
    CleverAgentsError,
    PartialCommitError,
    PoolExhaustedError,
    ResourceBusyError,
    ResourceError,
)
from cleveragents.hookspecs import hookimpl
from cleveragents.plugins import get_plugin_manager
from cleveragents.resource import Resource
from cleveragents.resource.handlers import _finalize as finalize_module
from cleveragents.resource.handlers import _pg_connection as pg_connection_module
from cleveragents.resource.handlers import _pgsql as pgsql
from cleveragents.resource.handlers import postgresql as postgresql_module
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.runtime import Runtime
from cleveragents.tools import ToolContext, ToolRegistry

DSN_VARIABLE = "CLEVERAGENTS_TEST_PG_DSN"
SKIP_REASON = (
    f"PostgreSQL tests need {DSN_VARIABLE}; start a throwaway server with "
    'eval "$(scripts/pg-test-server start)"'
)
if not os.environ.get(DSN_VARIABLE):
    pytest.skip(SKIP_REASON, allow_module_level=True)
psycopg = pytest.importorskip("psycopg")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CLI = Path(sys.executable).with_name("cleveragents")
RUNTIME_NAME = f"cleveragents[{os.getpid()}]"
PLANS_PER_PROCESS = 40


def _connect(dsn: str) -> Any:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """Return a DSN (with its password) whose ``search_path`` is a fresh schema."""
    base = os.environ[DSN_VARIABLE]
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with _connect(base) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    yield psycopg.conninfo.make_conninfo(base, options=f"-c search_path={schema}")
    with _connect(base) as admin:
        # A test that failed half-way may have left a session of ours holding locks.
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE starts_with(application_name, %s)",
            (RUNTIME_NAME,),
        )
        admin.execute("SET lock_timeout = '20s'")
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def make_handler(pg_dsn: str) -> Iterator[Callable[..., DatabaseResourceHandler]]:
    """Return a factory of handlers, all closed after the test (before its schema is dropped)."""
    made: list[DatabaseResourceHandler] = []

    def factory(**options: Any) -> DatabaseResourceHandler:
        handler = DatabaseResourceHandler(**options)
        made.append(handler)
        return handler

    yield factory
    for handler in made:
        handler.close()


@pytest.fixture
def password(pg_dsn: str) -> str:
    """Return the password in the test server's DSN."""
    secret = psycopg.conninfo.conninfo_to_dict(pg_dsn).get("password")
    assert secret, "the test DSN must carry a password"
    return str(secret)


@pytest.fixture
def db(pg_dsn: str) -> Iterator[Any]:
    """Return a separate connection to the test schema, to check what was committed."""
    with _connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE t (v TEXT)")
        yield conn


@pytest.fixture
def res(pg_dsn: str) -> Resource:
    """Return a PostgreSQL resource on the test schema."""
    return Resource("inv", "database", engine="postgresql", dsn=pg_dsn, busy_timeout=0.5)


def _values(db: Any, table: str = "t") -> list[Any]:
    return [row[0] for row in db.execute(f"SELECT v FROM {table} ORDER BY v").fetchall()]


def _backends(db: Any, prefix: str = RUNTIME_NAME) -> int:
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE starts_with(application_name, %s)",
        (prefix,),
    ).fetchone()
    return int(row[0])


# -- the same contract as SQLite ------------------------------------------------------


def test_plan_commits_and_rollback_to_recovers_an_aborted_transaction(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler(max_connections=2)
    handler.execute(res, "p1", "INSERT INTO t VALUES (:v)", {"v": "kept"})
    handler.create_checkpoint(res, "p1", "before-bad")
    with pytest.raises(psycopg.errors.UndefinedTable):
        handler.execute(res, "p1", "INSERT INTO missing VALUES (1)")
    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
        handler.execute(res, "p1", "INSERT INTO t VALUES ('lost')")
    handler.rollback_to(res, "p1", "before-bad")
    handler.execute(res, "p1", "INSERT INTO t VALUES (?)", ["after"])
    assert _values(db) == []  # nothing visible before the commit
    handler.release_plan("p1")
    assert _values(db) == ["after", "kept"]
    assert handler.stats().commits == 1


def test_release_of_an_aborted_plan_commits_nothing(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler()
    handler.execute(res, "p1", "INSERT INTO t VALUES ('doomed')")
    with pytest.raises(psycopg.errors.DivisionByZero):
        handler.execute(res, "p1", "SELECT 1 / 0")
    with pytest.raises(ResourceError, match="nothing was committed") as caught:
        handler.release_plan("p1")
    assert caught.value.operation == "commit"
    assert _values(db) == []
    stats = handler.stats()
    assert (stats.commits, stats.rollbacks, stats.active_plans) == (0, 1, 0)
    # The connection went back clean and serves the next plan.
    handler.execute(res, "p2", "INSERT INTO t VALUES ('next')")
    handler.release_plan("p2")
    assert _values(db) == ["next"]


def test_the_engine_never_sends_a_commit_the_server_would_turn_into_rollback(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource
) -> None:
    handler = make_handler()
    with handler.connection(res, "p1") as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        engine = handler._resolver.engines["postgresql"]
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            engine.commit(conn)  # not sent: the server would answer with a ROLLBACK
        assert not engine.is_clean(conn)
    handler.rollback_plan("p1")
    assert handler.stats().idle_connections == 1  # rolled back, clean, reusable


def test_rollback_plan_undoes_ddl_and_rows(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler()
    handler.execute(res, "p1", "CREATE TABLE made (v TEXT)")
    handler.execute(res, "p1", "INSERT INTO t VALUES ('x')")
    handler.rollback_plan("p1")
    assert _values(db) == []
    tables = db.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'made'").fetchone()
    assert tables == (0,)


def test_many_checkpoints_with_long_labels_use_short_savepoints(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler()
    labels = [f"{'step-' * 40}{n}" for n in range(30)]
    for n, label in enumerate(labels):
        handler.create_checkpoint(res, "p1", label)
        handler.execute(res, "p1", "INSERT INTO t VALUES (:v)", {"v": f"{n:02d}"})
    handler.rollback_to(res, "p1", labels[10])
    handler.rollback_to(res, "p1", labels[3])
    handler.release_plan("p1")
    assert _values(db) == ["00", "01", "02"]


def test_connection_lends_the_plans_psycopg_session(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler()
    with handler.connection(res, "p1") as conn:
        assert isinstance(conn, psycopg.Connection)
        conn.execute("INSERT INTO t VALUES (%s)", ("tool",))
        name = conn.execute("SELECT current_setting('application_name')").fetchone()[0]
        assert name == f"{RUNTIME_NAME}:p1"
        for refused in (conn.commit, conn.rollback, conn.__enter__):
            with pytest.raises(ResourceError, match=r"a plan's connection"):
                refused()
        timeouts = conn.execute(
            "SELECT name, setting::int FROM pg_settings WHERE name IN "
            "('lock_timeout', 'idle_in_transaction_session_timeout') ORDER BY name"
        ).fetchall()
    # busy_timeout 0.5s is the lock wait; the server's backstop is above the 300s TTL.
    (idle_name, idle_ms), (lock_name, lock_ms) = timeouts
    assert (lock_name, lock_ms) == ("lock_timeout", 500)
    assert idle_name == "idle_in_transaction_session_timeout"
    assert idle_ms > 300_000
    assert _values(db) == []
    handler.release_plan("p1")
    assert _values(db) == ["tool"]
    idle = db.execute(
        "SELECT application_name FROM pg_stat_activity WHERE starts_with(application_name, %s)",
        (RUNTIME_NAME,),
    ).fetchall()
    assert idle == [(RUNTIME_NAME,)]  # an idle session names only the runtime


def test_a_row_lock_held_elsewhere_makes_the_plan_busy(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, pg_dsn: str, db: Any
) -> None:
    db.execute("INSERT INTO t VALUES ('row')")
    handler = make_handler()
    with _connect(pg_dsn) as other:
        other.execute("BEGIN")
        other.execute("UPDATE t SET v = 'mine'")
        started = time.monotonic()
        with pytest.raises(ResourceBusyError, match="busy_timeout") as caught:
            handler.execute(res, "p1", "UPDATE t SET v = 'yours'")
        assert time.monotonic() - started < 10  # lock_timeout, not forever
        other.execute("ROLLBACK")
    assert caught.value.plan_id == "p1"
    assert caught.value.operation == "execute"
    assert handler.stats().busy_timeouts == 1
    handler.rollback_plan("p1")


def test_a_deadlock_makes_one_plan_busy_and_the_other_commits(
    make_handler: Callable[..., DatabaseResourceHandler], pg_dsn: str, db: Any
) -> None:
    db.execute("INSERT INTO t VALUES ('a'), ('b')")
    res = Resource("inv", "database", engine="postgresql", dsn=pg_dsn, busy_timeout=20)
    handler = make_handler()
    both_locked = threading.Barrier(2, timeout=10)
    errors: dict[str, BaseException] = {}

    def plan(plan_id: str, first: str, second: str) -> None:
        try:
            handler.execute(res, plan_id, "UPDATE t SET v = v WHERE v = :v", {"v": first})
            both_locked.wait()
            handler.execute(res, plan_id, "UPDATE t SET v = v WHERE v = :v", {"v": second})
            handler.release_plan(plan_id)
        except CleverAgentsError as exc:
            errors[plan_id] = exc
            handler.rollback_plan(plan_id)

    threads = [
        threading.Thread(target=plan, args=("ab", "a", "b")),
        threading.Thread(target=plan, args=("ba", "b", "a")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(errors) == 1, errors
    (error,) = errors.values()
    assert isinstance(error, ResourceBusyError)
    assert "deadlock" in str(error)
    assert handler.stats().commits == 1


def test_serializable_conflicts_are_busy(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    db.execute("INSERT INTO t VALUES ('x')")
    handler = make_handler()
    handler.execute(res, "p1", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    handler.execute(res, "p1", "SELECT count(*) FROM t")
    db.execute("UPDATE t SET v = 'changed'")
    with pytest.raises(ResourceBusyError, match="serialize"):
        handler.execute(res, "p1", "UPDATE t SET v = 'mine'")
    handler.rollback_plan("p1")
    assert _values(db) == ["changed"]


# -- concurrency and bounds ------------------------------------------------------------


def test_eight_threads_forty_plans_each_give_exact_rows_within_the_bound(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    limit = 4
    assert eventually(lambda: _backends(db) == 0), "sessions of earlier tests are still open"
    handler = make_handler(max_connections=limit, acquire_timeout=30)
    errors: list[BaseException] = []
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        with _connect(os.environ[DSN_VARIABLE]) as watcher:
            while not done.is_set():
                peak = max(peak, _backends(watcher))
                time.sleep(0.005)

    def writer(thread: int) -> None:
        try:
            for n in range(40):
                plan_id = f"w{thread}-{n}"
                handler.create_checkpoint(res, plan_id, "start")
                handler.execute(res, plan_id, "INSERT INTO t VALUES (:v)", {"v": plan_id})
                if n % 2:
                    handler.rollback_plan(plan_id)
                else:
                    handler.release_plan(plan_id)
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    done.set()
    sampler.join(10)
    assert errors == []
    expected = sorted(f"w{t}-{n}" for t in range(8) for n in range(0, 40, 2))
    assert _values(db) == expected
    stats = handler.stats()
    assert (stats.commits, stats.rollbacks, stats.busy_timeouts) == (160, 160, 0)
    assert 1 <= peak <= limit
    assert stats.open_connections <= limit


def test_max_connections_counts_sqlite_and_postgresql_together(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, tmp_path: Path
) -> None:
    lite = Resource("lite", "database", engine="sqlite", location=str(tmp_path / "x.db"))
    handler = make_handler(max_connections=2, acquire_timeout=0.2)
    handler.execute(lite, "a", "SELECT 1")
    handler.execute(res, "b", "SELECT 1")
    with pytest.raises(PoolExhaustedError):
        handler.execute(res, "c", "SELECT 1")
    with pytest.raises(PoolExhaustedError):
        handler.execute(lite, "c", "SELECT 1")
    handler.release_plan("a")
    handler.execute(res, "c", "SELECT 1")  # the idle SQLite connection gave up its slot
    assert handler.stats().open_connections == 2
    handler.release_plan("b")
    handler.release_plan("c")


def test_a_session_the_server_ended_expires_the_plan(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler()
    handler.create_checkpoint(res, "p1", "cp")
    with handler.connection(res, "p1") as conn:
        conn.execute("INSERT INTO t VALUES ('gone')")
        conn.execute("SET LOCAL idle_in_transaction_session_timeout = 50")
    time.sleep(0.4)  # the server ends the session; the reaper (300s) has not acted
    with pytest.raises(CheckpointExpiredError, match="server ended") as caught:
        handler.execute(res, "p1", "SELECT 1")
    assert caught.value.plan_id == "p1"
    handler.interrupt()  # nothing runs on a closed session: nothing to cancel
    # Asked before any COMMIT: commits nothing on any database (the server rolled it back).
    with pytest.raises(ResourceError, match="nothing was committed: the server ended"):
        handler.release_plan("p1")
    assert _values(db) == []
    assert handler.stats().open_connections == 0


@pytest.mark.parametrize("ending", ["release_plan", "rollback_plan"])
def test_a_terminated_session_expires_the_release_and_rolls_back_quietly(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any, ending: str
) -> None:
    handler = make_handler()
    with handler.connection(res, "p1") as conn:
        conn.execute("INSERT INTO t VALUES ('gone')")
        pid = conn.info.backend_pid
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert eventually(
        lambda: (
            db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
            == (0,)
        )
    )
    # The client learns of it only now: the release, which asks every database
    # before its first COMMIT, commits nothing; ROLLBACK has nothing left to do
    # (the server rolled back), so it does not raise.
    if ending == "release_plan":
        with pytest.raises(ResourceError, match="nothing was committed: the server ended"):
            handler.release_plan("p1")
    else:
        handler.rollback_plan("p1")
    assert _values(db) == []
    stats = handler.stats()
    assert (stats.open_connections, stats.rollbacks, stats.commits) == (0, 1, 0)


# -- interrupt, close, fork -------------------------------------------------------------


def test_interrupt_cancels_the_running_statement(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler()
    outcome: list[BaseException] = []
    running = threading.Event()

    def sleeper() -> None:
        try:
            handler.execute(res, "p1", "INSERT INTO t VALUES ('x')")
            running.set()
            handler.execute(res, "p1", "SELECT pg_sleep(30)")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=sleeper)
    started = time.monotonic()
    thread.start()
    assert running.wait(10)
    assert eventually(
        lambda: (
            db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
                " AND state = 'active'"
            ).fetchone()
            == (1,)
        )
    )
    handler.interrupt()
    thread.join(10)
    assert time.monotonic() - started < 15
    assert [type(exc) for exc in outcome] == [psycopg.errors.QueryCanceled]
    handler.rollback_plan("p1")
    assert _values(db) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_cancels_the_statement_and_rolls_the_plan_back(
    tmp_path: Path, pg_dsn: str, db: Any, signum: int
) -> None:
    plan = tmp_path / "slow.yaml"
    plan.write_text(
        "id: slow\nresources:\n  inv: {kind: database, engine: postgresql, dsn: '${TEST_DSN}'}\n"
        "steps:\n"
        "  - {id: write, resource: inv, sql: \"INSERT INTO t VALUES ('x')\"}\n"
        "  - {id: wait, resource: inv, sql: 'SELECT pg_sleep(60)'}\n"
    )
    env = {**os.environ, "TEST_DSN": pg_dsn}
    with subprocess.Popen(
        [CLI, "run", str(plan)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert eventually(
            lambda: (
                db.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
                ).fetchone()
                == (1,)
            ),
            timeout=20,
        )
        started = time.monotonic()
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 128 + signum, stderr
    assert time.monotonic() - started < 10
    assert "Traceback" not in stderr
    assert _values(db) == []


def test_close_and_garbage_collection_end_every_session(pg_dsn: str, db: Any) -> None:
    res = Resource("inv", "database", engine="postgresql", dsn=pg_dsn)
    assert eventually(lambda: _backends(db) == 0)
    handler = DatabaseResourceHandler(max_connections=3)
    for n in range(3):
        handler.execute(res, f"p{n}", "INSERT INTO t VALUES (:v)", {"v": f"p{n}"})
    handler.release_plan("p0")
    assert _backends(db) == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del handler
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    assert eventually(lambda: _backends(db) == 0)
    assert _values(db) == ["p0"]

    closing = DatabaseResourceHandler()
    closing.execute(res, "q", "INSERT INTO t VALUES ('q')")
    closing.close()
    closing.close()
    assert eventually(lambda: _backends(db) == 0)
    assert _values(db) == ["p0"]


def test_a_forked_child_never_touches_the_parents_session(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler()
    handler.execute(res, "parent", "INSERT INTO t VALUES ('parent')")
    pid = os.fork()
    if pid == 0:  # the child: its handler starts empty
        code = 0
        try:
            assert handler.stats().open_connections == 0
            handler.rollback_plan("parent")  # not the child's plan: does nothing
            handler.execute(res, "child", "INSERT INTO t VALUES ('child')")
            handler.release_plan("child")
            handler.close()
            # Free the parent's session objects here too: freeing must not end it.
            finalize_module._INHERITED.clear()
            gc.collect()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    handler.execute(res, "parent", "INSERT INTO t VALUES ('parent 2')")
    handler.release_plan("parent")
    assert _values(db) == ["child", "parent", "parent 2"]


# -- plans through the runtime -----------------------------------------------------------


class _Tools:
    """A tool that swallows a failed statement, leaving the transaction aborted."""

    @hookimpl
    def cleveragents_register_tools(self, registry: ToolRegistry) -> None:
        registry.add("swallow_error", self.swallow_error)

    def swallow_error(self, ctx: ToolContext) -> None:
        with ctx.connection("inv") as conn, contextlib.suppress(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")


def _write_plan(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(body)
    return path


_RESOURCE = "resources:\n  inv: {kind: database, engine: postgresql, dsn: '${TEST_DSN}'}\n"


def test_a_retried_step_recovers_from_an_aborted_transaction(
    tmp_path: Path, pg_dsn: str, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_DSN", pg_dsn)
    db.execute("CREATE SEQUENCE attempts")
    # nextval is not rolled back: the first attempt divides by zero, the second works.
    plan_file = _write_plan(
        tmp_path,
        "retry.yaml",
        "id: retry\n" + _RESOURCE + "steps:\n"
        "  - {id: first, resource: inv, sql: \"INSERT INTO t VALUES ('first')\"}\n"
        "  - id: flaky\n    resource: inv\n    retry: 2\n"
        "    sql: INSERT INTO t SELECT 'try ' || (1 / (nextval('attempts') - 1))\n",
    )
    with Runtime() as runtime:
        result = runtime.run(runtime.load(plan_file))
    assert result.completed, result.error
    assert [step.attempts for step in result.steps] == [1, 2]
    assert _values(db) == ["first", "try 1"]


def test_a_plan_left_aborted_by_a_tool_fails_and_commits_nothing(
    tmp_path: Path, pg_dsn: str, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_DSN", pg_dsn)
    pm = get_plugin_manager()
    pm.register(_Tools())
    plan_file = _write_plan(
        tmp_path,
        "aborted.yaml",
        "id: aborted\n" + _RESOURCE + "steps:\n"
        "  - {id: write, resource: inv, sql: \"INSERT INTO t VALUES ('x')\"}\n"
        "  - {id: swallow, tool: swallow_error}\n",
    )
    with Runtime(plugin_manager=pm) as runtime:
        result = runtime.run(runtime.load(plan_file))
    assert result.status == "failed"
    assert result.error is not None and "nothing was committed" in result.error
    assert _values(db) == []


def _inventory(db: Any) -> dict[str, list[Any]]:
    """Return every table of the test schema with its rows: the database as a user sees it."""
    tables = [
        row[0]
        for row in db.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
        ).fetchall()
    ]
    return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() for table in tables}


def _example_on_postgresql(name: str, folder: Path) -> Path:
    """Copy an example plan, changing only its resource entry to PostgreSQL."""
    text = (EXAMPLES / name).read_text()
    changed = re.sub(
        r"    engine: sqlite\n    location: [^\n]*\n",
        '    engine: postgresql\n    dsn: "${TEST_DSN}"\n',
        text,
    )
    assert changed.count("engine: postgresql") == 1
    path = folder / name
    path.write_text(changed)
    return path


def test_the_example_plans_run_on_postgresql_changing_only_the_resource(
    tmp_path: Path, pg_dsn: str, db: Any
) -> None:
    env = {**os.environ, "TEST_DSN": pg_dsn}

    def run(name: str) -> subprocess.CompletedProcess[str]:
        plan = _example_on_postgresql(name, tmp_path)
        return subprocess.run(
            [CLI, "run", "--json", str(plan)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    restock = run("restock.yaml")
    assert restock.returncode == 0, restock.stdout + restock.stderr
    assert db.execute("SELECT sku, qty FROM items ORDER BY sku").fetchall() == [
        ("apple", 12),
        ("pear", 7),
        ("plum", 10),
    ]
    before = _inventory(db)
    failed = run("sell-too-much.yaml")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert json.loads(failed.stdout)["failed_step"] == "sell-pears"
    assert _inventory(db) == before  # no sales table, no sold apples
    report = run("report.yaml")
    assert report.returncode == 0, report.stdout + report.stderr
    assert db.execute("SELECT plan, channel, low_items FROM reports").fetchall() == [
        ("report", "ops", 0)
    ]


def test_two_processes_running_plans_in_parallel_give_exact_rows(
    tmp_path: Path, pg_dsn: str, db: Any
) -> None:
    env = {**os.environ, "TEST_DSN": pg_dsn}
    db.execute("CREATE TABLE counter (n INT NOT NULL)")
    db.execute("INSERT INTO counter VALUES (0)")
    batches: list[list[Path]] = []
    for process in range(2):
        folder = tmp_path / f"process{process}"
        folder.mkdir()
        plans = []
        for n in range(PLANS_PER_PROCESS):
            plan_id = f"p{process}-{n:02d}"
            fails = n % 4 == 3
            # Every plan adds its row and bumps one shared counter row (a row lock
            # both processes wait for); a failing plan's check fails after both.
            plans.append(
                _write_plan(
                    folder,
                    f"{plan_id}.yaml",
                    f"id: {plan_id}\n" + _RESOURCE + "steps:\n"
                    f"  - {{id: write, resource: inv, sql: \"INSERT INTO t VALUES ('{plan_id}')\"}}"
                    "\n"
                    "  - {id: count, resource: inv, sql: UPDATE counter SET n = n + 1}\n"
                    "  - id: check\n    resource: inv\n    expect:\n"
                    f"      sql: SELECT count(*) FROM t WHERE v = '{plan_id}'\n"
                    f"      equals: {2 if fails else 1}\n",
                )
            )
        batches.append(plans)
    processes = [
        subprocess.Popen(
            [CLI, "run", "--json", "--parallel", "4", *map(str, plans)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for plans in batches
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 1, stderr  # some plans failed, on purpose
        results = [json.loads(line) for line in stdout.splitlines()]
        assert len(results) == PLANS_PER_PROCESS
        for result in results:
            expected = "failed" if int(result["plan"][-2:]) % 4 == 3 else "completed"
            assert result["status"] == expected, result
    committed = sorted(
        f"p{p}-{n:02d}" for p in range(2) for n in range(PLANS_PER_PROCESS) if n % 4 != 3
    )
    assert _values(db) == committed
    assert db.execute("SELECT n FROM counter").fetchone() == (len(committed),)


# -- the DSN never shows ------------------------------------------------------------------


def test_the_dsn_never_shows_in_errors_logs_repr_or_json(
    tmp_path: Path,
    pg_dsn: str,
    password: str,
    db: Any,
    make_handler: Callable[..., DatabaseResourceHandler],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = pg_dsn.replace(password, password[::-1])
    shown: list[str] = []

    def record(exc: BaseException) -> None:
        while exc is not None:
            shown.extend((str(exc), repr(exc)))
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]

    res = Resource("inv", "database", engine="postgresql", dsn=pg_dsn, busy_timeout=0.1)
    bad = Resource("inv", "database", engine="postgresql", dsn=wrong)
    handler = make_handler(max_connections=2)
    shown += [repr(res), repr(bad), repr(handler), str(handler.stats())]
    with pytest.raises(ResourceError) as failed_open:
        handler.execute(bad, "p-wrong", "SELECT 1")
    record(failed_open.value)
    assert "password authentication failed" in str(failed_open.value)
    db.execute("INSERT INTO t VALUES ('locked')")
    with _connect(pg_dsn) as other:
        other.execute("BEGIN")
        other.execute("UPDATE t SET v = 'x'")
        with pytest.raises(ResourceBusyError) as busy:
            handler.execute(res, "p-busy", "UPDATE t SET v = 'y'")
        record(busy.value)
        other.execute("ROLLBACK")
    handler.rollback_plan("p-busy")
    handler.close()
    # The command line: a failing plan's --json line and validation of a bad plan.
    plan = _write_plan(
        tmp_path,
        "p.yaml",
        "id: p\n" + _RESOURCE + "steps:\n  - {id: one, resource: inv, sql: SELECT 1}\n",
    )
    env = {**os.environ, "TEST_DSN": wrong}
    for command in (["run", "--json"], ["run"], ["validate"]):
        result = subprocess.run(
            [CLI, *command, str(plan)], env=env, capture_output=True, text=True, check=False
        )
        shown += [result.stdout, result.stderr]
    assert "password authentication failed" in shown[-6]
    shown += [record.getMessage() for record in caplog.records]
    shown += [str(record.args) for record in caplog.records]
    for text in shown:
        assert password not in text
        assert password[::-1] not in text
        assert pg_dsn not in text
    assert caplog.records, "expected some log lines to check"


@pytest.mark.parametrize("statement", ["COMMIT", "ROLLBACK", "END", "ABORT"])
def test_plan_sql_that_ends_the_transaction_stops_the_plan(
    tmp_path: Path,
    pg_dsn: str,
    db: Any,
    monkeypatch: pytest.MonkeyPatch,
    statement: str,
) -> None:
    monkeypatch.setenv("TEST_DSN", pg_dsn)
    plan_file = _write_plan(
        tmp_path,
        "hostile.yaml",
        "id: hostile\n" + _RESOURCE + "steps:\n"
        "  - {id: before, resource: inv, sql: \"INSERT INTO t VALUES ('before')\"}\n"
        f"  - {{id: end, resource: inv, sql: {statement}}}\n"
        "  - {id: after, resource: inv, sql: \"INSERT INTO t VALUES ('after')\"}\n",
    )
    with Runtime() as runtime:
        result = runtime.run(runtime.load(plan_file))
    assert result.status == "failed"
    assert result.failed_step == "end"
    assert result.error is not None
    assert f"plans may not run {statement}: cleveragents owns" in result.error
    # Refused before it ran: the plan failed whole, nothing of it is left.
    assert _values(db) == []


@pytest.mark.parametrize(
    ("sql", "refused"),
    [
        ("COMMIT", "COMMIT"),
        ("/* quiet */ end", "END"),
        ("ROLLBACK", "ROLLBACK"),
        ("ROLLBACK TO SAVEPOINT cp_1", "ROLLBACK"),
        ("RELEASE SAVEPOINT cp_1", "RELEASE"),
        ("PREPARE TRANSACTION 'gone'", "PREPARE TRANSACTION"),
        ("INSERT INTO t VALUES ('sneaked'); COMMIT", "more than one statement"),
        ("SET lock_timeout = 0", "SET without LOCAL"),
        ("RESET ALL", "RESET"),
    ],
)
def test_plan_sql_that_would_take_over_is_refused_before_it_runs(
    make_handler: Callable[..., DatabaseResourceHandler],
    res: Resource,
    db: Any,
    sql: str,
    refused: str,
) -> None:
    handler = make_handler()
    handler.create_checkpoint(res, "p", "start")
    handler.execute(res, "p", "INSERT INTO t VALUES ('until the plan ends')")
    with pytest.raises(ResourceError, match=f"plans may not run {refused}"):
        handler.execute(res, "p", sql)
    assert _values(db) == []  # nothing committed behind the plan's back
    handler.rollback_to(res, "p", "start")
    handler.execute(res, "p", "SET LOCAL lock_timeout = '1s'")  # ends with the plan: fine
    handler.execute(res, "p", "INSERT INTO t VALUES ('after; and ''COMMIT''')")
    handler.release_plan("p")
    assert _values(db) == ["after; and 'COMMIT'"]


def test_sql_that_slips_past_the_reading_still_cannot_commit_later_statements(
    make_handler: Callable[..., DatabaseResourceHandler],
    res: Resource,
    db: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The backstop behind the statement check: pretend the check missed a COMMIT.
    monkeypatch.setattr(pg_connection_module, "_read", lambda sql, standard=True: (None, ""))
    handler = make_handler()
    handler.execute(res, "p", "INSERT INTO t VALUES ('x')")
    with pytest.raises(ResourceError, match=r"ended the plan's transaction \(ROLLBACK\)"):
        handler.execute(res, "p", "ROLLBACK")
    handler.rollback_plan("p")
    assert _values(db) == []


def test_the_lent_session_refuses_to_end_the_plan_whichever_way_it_is_asked(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler()
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('until the plan ends')")
        with pytest.raises(ResourceError, match="plans may not run COMMIT"):
            conn.execute("COMMIT")
        with conn.cursor() as cursor, pytest.raises(ResourceError, match="plans may not run END"):
            cursor.execute(b"END")
        with conn.cursor() as cursor, pytest.raises(ResourceError, match="ROLLBACK"):
            cursor.executemany(psycopg.sql.SQL("ROLLBACK"), [()])
        with pytest.raises(ResourceError, match="SET without LOCAL"):
            conn.execute("SET statement_timeout = 0")
        conn.execute("SET LOCAL statement_timeout = '5s'")
    assert _values(db) == []
    handler.rollback_plan("p")
    assert _values(db) == []


def test_pooled_sessions_the_server_ended_are_replaced_not_failed(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler(max_connections=4)
    for number in range(3):  # three plans at once: three pooled sessions
        handler.execute(res, f"warm {number}", "SELECT 1")
    for number in range(3):
        handler.release_plan(f"warm {number}")
    assert handler.stats().idle_connections == 3
    # A server restart or an idle timeout ends every idle session.
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE starts_with(application_name, %s)",
        (RUNTIME_NAME,),
    )
    assert eventually(lambda: _backends(db) == 0)

    for number in range(4):
        handler.execute(res, f"new {number}", f"INSERT INTO t VALUES ('new {number}')")
        handler.release_plan(f"new {number}")
    assert _values(db) == [f"new {number}" for number in range(4)]
    assert handler.stats().open_connections <= 4


# -- a plan's work stays inside its transaction, whatever the lent session is asked ---------


def _one_line(error: BaseException, secrets: tuple[str, ...]) -> str:
    """Return *error*'s message after checking it is one line holding no secret."""
    text = str(error)
    assert "\n" not in text, text
    for secret in secrets:
        assert secret not in text
    return text


def _stream_commit(conn: Any) -> None:
    list(conn.cursor().stream("COMMIT"))


def _copy_commit(conn: Any) -> None:
    with conn.cursor().copy("COMMIT"):
        pass


def _named_cursor_commit(conn: Any) -> None:
    conn.cursor("named").execute("SELECT 1; COMMIT")


def _executemany_commit(conn: Any) -> None:
    conn.cursor().executemany("COMMIT", [(), ()])


def _client_cursor_commit(conn: Any) -> None:
    conn.cursor_factory = psycopg.ClientCursor
    conn.execute("SELECT %s; COMMIT", ("x",))


def _raw_cursor_commit(conn: Any) -> None:
    conn.cursor_factory = psycopg.RawCursor
    conn.execute("COMMIT")


def _custom_cursor_commit(conn: Any) -> None:
    class Mine(psycopg.Cursor):  # type: ignore[type-arg]
        pass

    conn.cursor_factory = Mine
    conn.execute("COMMIT")


def _pipeline_commit(conn: Any) -> None:
    with conn.pipeline():
        conn.execute("COMMIT")


def _prepared_commit(conn: Any) -> None:
    conn.prepare_threshold = 0
    conn.execute("SELECT 1 -- \r; COMMIT", prepare=True)


def _composed_commit(conn: Any) -> None:
    conn.execute(psycopg.sql.SQL("{}").format(psycopg.sql.SQL("COMMIT")))


def _base_execute_commit(conn: Any) -> None:
    psycopg.Connection.execute(conn, "ROLLBACK")


@pytest.mark.parametrize(
    ("route", "refused"),
    [
        (_stream_commit, "plans may not run COMMIT"),
        (_copy_commit, "plans may not run COMMIT"),
        (_named_cursor_commit, "more than one statement"),
        (_executemany_commit, "plans may not run COMMIT"),
        (_client_cursor_commit, "more than one statement"),
        (_raw_cursor_commit, "plans may not run COMMIT"),
        (_custom_cursor_commit, "plans may not run COMMIT"),
        (_pipeline_commit, "plans may not run COMMIT"),
        (_prepared_commit, "more than one statement"),
        (_composed_commit, "plans may not run COMMIT"),
        (_base_execute_commit, "plans may not run ROLLBACK"),
    ],
)
def test_every_way_a_lent_session_sends_sql_is_read_before_it_runs(
    make_handler: Callable[..., DatabaseResourceHandler],
    res: Resource,
    db: Any,
    password: str,
    pg_dsn: str,
    route: Callable[[Any], None],
    refused: str,
) -> None:
    handler = make_handler(max_connections=1)
    handler.create_checkpoint(res, "p", "start")
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('until the plan ends')")
        with pytest.raises(ResourceError) as caught:
            route(conn)
    assert refused in _one_line(caught.value, (password, pg_dsn))
    assert _values(db) == []  # refused before it ran: nothing committed behind the plan
    # The plan goes on in its transaction, and commits once, when it is released.
    handler.rollback_to(res, "p", "start")
    handler.execute(res, "p", "INSERT INTO t VALUES ('after')")
    assert _values(db) == []
    handler.release_plan("p")
    assert _values(db) == ["after"]
    # Its session went back to the pool with the guard on every cursor class.
    with handler.connection(res, "next") as conn:
        with pytest.raises(ResourceError, match="plans may not run COMMIT"):
            conn.execute("COMMIT")
        assert conn.cursor_factory is not psycopg.RawCursor
    handler.rollback_plan("next")


@pytest.mark.parametrize(
    ("call", "refused"),
    [
        (lambda conn: conn.transaction().__enter__(), r"cannot open conn\.transaction\(\)"),
        (lambda conn: setattr(conn, "autocommit", False), "cannot change autocommit"),
        (lambda conn: conn.set_autocommit(True), "cannot change autocommit"),
        (
            lambda conn: setattr(conn, "isolation_level", psycopg.IsolationLevel.SERIALIZABLE),
            "cannot change isolation_level",
        ),
        (lambda conn: conn.set_isolation_level(None), "cannot change isolation_level"),
        (lambda conn: setattr(conn, "read_only", True), "cannot change read_only"),
        (lambda conn: conn.set_read_only(True), "cannot change read_only"),
        (lambda conn: conn.set_deferrable(True), "cannot change deferrable"),
        (lambda conn: conn.close(), r"cannot close\(\)"),
        (lambda conn: conn.tpc_begin("x"), "cannot run two-phase commit"),
        (lambda conn: conn.tpc_commit("x"), "cannot run two-phase commit"),
        (lambda conn: setattr(conn, "cursor_factory", 42), "takes a psycopg cursor class"),
    ],
)
def test_the_lent_session_refuses_what_would_end_or_change_the_plans_transaction(
    make_handler: Callable[..., DatabaseResourceHandler],
    res: Resource,
    db: Any,
    call: Callable[[Any], object],
    refused: str,
) -> None:
    handler = make_handler()
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('kept')")
        with pytest.raises(ResourceError, match=refused) as caught:
            call(conn)
        _one_line(caught.value, ())
        assert not conn.closed
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert _values(db) == []
    handler.release_plan("p")
    assert _values(db) == ["kept"]


def _raw_commit(conn: Any) -> None:
    conn.pgconn.exec_(b"COMMIT")


def _raw_commit_begin(conn: Any) -> None:
    conn.pgconn.exec_(b"COMMIT; BEGIN")


def _base_cursor_commit_begin(conn: Any) -> None:
    psycopg.Cursor(conn).execute("COMMIT; BEGIN")


def _forged_marker(conn: Any) -> None:
    # Begins another transaction and copies what the server reports about the plan's.
    name = conn.info.parameter_status("application_name")
    conn.pgconn.exec_(f"COMMIT; BEGIN; SET LOCAL application_name = '{name}'".encode())


def _flag_flipped(conn: Any) -> None:
    conn.handler_statement = True
    conn.execute("ROLLBACK; BEGIN")
    conn.handler_statement = False


@pytest.mark.parametrize(
    "route", [_raw_commit, _raw_commit_begin, _base_cursor_commit_begin, _flag_flipped]
)
def test_sql_sent_around_the_guard_poisons_the_plan_on_every_database(
    make_handler: Callable[..., DatabaseResourceHandler],
    res: Resource,
    db: Any,
    tmp_path: Path,
    password: str,
    pg_dsn: str,
    route: Callable[[Any], None],
) -> None:
    handler = make_handler()
    other = Resource("notes", "database", engine="sqlite", location=str(tmp_path / "notes.db"))
    handler.execute(other, "p", "CREATE TABLE n (v TEXT)")
    handler.execute(other, "p", "INSERT INTO n VALUES ('sqlite')")
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('before')")
        route(conn)
    # Noticed as the block ended: no later statement runs outside the plan's transaction.
    with pytest.raises(ResourceError, match="can no longer commit") as caught:
        handler.execute(res, "p", "INSERT INTO t VALUES ('after')")
    assert "around cleveragents' guard" in _one_line(caught.value, (password, pg_dsn))
    with pytest.raises(ResourceError, match="nothing was committed") as released:
        handler.release_plan("p")
    assert "around cleveragents' guard" in _one_line(released.value, (password, pg_dsn))
    # The SQLite database, used first, committed nothing; on PostgreSQL only what
    # the plan's own COMMIT ran (or its ROLLBACK undid) before it was noticed.
    assert _sqlite_tables(tmp_path / "notes.db") == []
    assert _values(db) in ([], ["before"])
    assert "after" not in _values(db)
    stats = handler.stats()
    assert (stats.commits, stats.rollbacks, stats.open_connections) == (0, 1, 1)
    assert eventually(lambda: _backends(db) == 0)  # that session is closed, not pooled


def _sqlite_tables(path: Path) -> list[Any]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT name FROM sqlite_master").fetchall()]
    finally:
        conn.close()


def test_a_forged_transaction_is_caught_by_the_commit_itself(
    make_handler: Callable[..., DatabaseResourceHandler],
    res: Resource,
    db: Any,
    tmp_path: Path,
) -> None:
    # The plan ends its transaction through libpq and copies what the server
    # reports of the plan's one onto another: the client cannot tell, but the
    # COMMIT message first checks the token only the plan's transaction holds.
    handler = make_handler()
    other = Resource("notes", "database", engine="sqlite", location=str(tmp_path / "notes.db"))
    handler.execute(other, "p", "CREATE TABLE n (v TEXT)")
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('before')")
        _forged_marker(conn)
        conn.execute("INSERT INTO t VALUES ('in the forged transaction')")
    with pytest.raises(PartialCommitError) as caught:
        handler.release_plan("p")
    # What was committed is said exactly: the database committed before this
    # one in first-use order, not the forged transaction.
    assert caught.value.committed == ["notes"]
    assert "COMMIT was not run: SQL the plan ran around cleveragents' guard" in str(caught.value)
    assert _values(db) == ["before"]  # committed by the plan's own COMMIT, nothing after
    assert _sqlite_tables(tmp_path / "notes.db") == ["n"]
    assert eventually(lambda: _backends(db) == 0)


# -- nothing of a plan outlives it on a pooled session ------------------------------------

# What a plan leaves on its session, and how the next plan on that session
# (one connection: the same backend) would see it. Each check runs in the next
# plan and must see a fresh session.
_LEFTOVERS: dict[str, tuple[str, str | None]] = {
    "set_config lock_timeout": (
        "SELECT set_config('lock_timeout', '0', false)",
        "SELECT current_setting('lock_timeout') = '500ms'",
    ),
    "set_config idle backstop": (
        "SELECT set_config('idle_in_transaction_session_timeout', '0', false)",
        "SELECT setting::int > 300000 FROM pg_settings "
        "WHERE name = 'idle_in_transaction_session_timeout'",
    ),
    "set_config search_path": (
        "SELECT set_config('search_path', 'pg_catalog', false)",
        "SELECT current_setting('search_path') LIKE 't\\_%'",
    ),
    "temporary table": (
        "CREATE TEMP TABLE t (v TEXT)",
        "SELECT count(*) = 0 FROM pg_class WHERE relpersistence = 't'",
    ),
    "temporary view": (
        "CREATE TEMP VIEW t AS SELECT 'shadow'::text AS v",
        "SELECT count(*) = 0 FROM pg_class WHERE relpersistence = 't'",
    ),
    "prepared statement": (
        "PREPARE leftover AS SELECT 1",
        "SELECT count(*) = 0 FROM pg_prepared_statements WHERE from_sql",
    ),
    "advisory lock": (
        "SELECT pg_advisory_lock(4242)",
        "SELECT count(*) = 0 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
    ),
    "LISTEN": ("LISTEN leftover", "SELECT count(*) = 0 FROM pg_listening_channels()"),
    "cursor WITH HOLD": (
        "DECLARE leftover CURSOR WITH HOLD FOR SELECT 1",
        "SELECT count(*) = 0 FROM pg_cursors",
    ),
    # currval() of a sequence the last plan advanced: an error in a fresh session.
    "sequence state": ("SELECT nextval('s')", None),
}


@pytest.mark.parametrize("ending", ["release_plan", "rollback_plan"])
@pytest.mark.parametrize("leftover", sorted(_LEFTOVERS))
def test_nothing_a_plan_left_on_its_session_reaches_the_next_plan(
    make_handler: Callable[..., DatabaseResourceHandler],
    res: Resource,
    db: Any,
    leftover: str,
    ending: str,
) -> None:
    db.execute("CREATE SEQUENCE s")
    handler = make_handler(max_connections=1)
    leave, check = _LEFTOVERS[leftover]
    with handler.connection(res, "first") as conn:
        first_pid = conn.info.backend_pid
    handler.execute(res, "first", leave)
    getattr(handler, ending)("first")
    with handler.connection(res, "next") as conn:
        assert conn.info.backend_pid == first_pid  # the same pooled session
    if check is None:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            handler.execute(res, "next", "SELECT currval('s')")
        handler.rollback_plan("next")
        return
    assert handler.execute(res, "next", check) == [(True,)]
    # An unqualified name reaches the plan's schema, not something the last plan made.
    handler.execute(res, "next", "INSERT INTO t VALUES ('next')")
    handler.release_plan("next")
    assert _values(db) == ["next"]


def test_a_lock_timeout_a_plan_switched_off_does_not_make_the_next_plan_wait_forever(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any, pg_dsn: str
) -> None:
    handler = make_handler(max_connections=1)
    handler.execute(res, "first", "SELECT set_config('lock_timeout', '0', false)")
    handler.release_plan("first")
    db.execute("INSERT INTO t VALUES ('locked')")
    holder = _connect(pg_dsn)
    holder.execute("BEGIN")
    holder.execute("SELECT * FROM t FOR UPDATE")
    outcome: list[BaseException | None] = []

    def writer() -> None:
        try:
            handler.execute(res, "next", "UPDATE t SET v = 'changed'")
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join(timeout=10)  # busy_timeout is 0.5s; a wait without bound never ends
    holder.execute("ROLLBACK")  # lets a writer that waited without bound go on
    holder.close()
    thread.join()
    assert len(outcome) == 1 and isinstance(outcome[0], ResourceBusyError), outcome
    handler.rollback_plan("next")
    assert _values(db) == ["locked"]


def test_what_a_plan_set_on_the_connection_object_does_not_reach_the_next_plan(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler(max_connections=1)
    heard: list[str] = []
    with handler.connection(res, "first") as conn:
        conn.row_factory = psycopg.rows.dict_row
        conn.cursor_factory = psycopg.ClientCursor
        conn.prepare_threshold = 0
        conn.add_notice_handler(lambda diagnostic: heard.append(str(diagnostic.message_primary)))
        conn.add_notify_handler(lambda notify: heard.append(notify.payload))

        class Shout(psycopg.adapt.Dumper):
            oid = psycopg.adapters.types["text"].oid

            def dump(self, obj: str) -> bytes:
                return obj.upper().encode()

        conn.adapters.register_dumper(str, Shout)
        # In its own block the plan gets what it asked for...
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        # ...but never in what the handler runs for it.
        assert handler.execute(res, "first", "SELECT 1 AS one") == [(1,)]
    handler.release_plan("first")

    with handler.connection(res, "next") as conn:
        assert conn.row_factory is psycopg.rows.tuple_row
        assert not issubclass(conn.cursor_factory, psycopg.ClientCursor)
        assert conn.prepare_threshold == 5  # psycopg's default
        conn.execute("INSERT INTO t VALUES (%s)", ("quiet",))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'private to the next plan'; END $$")
        assert conn.execute("SELECT 1 AS one").fetchone() == (1,)
    handler.release_plan("next")
    assert _values(db) == ["quiet"]
    assert heard == []


# -- the guard reads SQL as the server does ----------------------------------------------


@pytest.mark.parametrize(
    "steps",
    [
        ["SELECT 1 --\r; COMMIT; BEGIN"],
        ["SELECT 1 AS \u00d7$a$; COMMIT; SELECT 1 AS \u00d7$a$"],
        ["SET LOCAL standard_conforming_strings = off", "SELECT 'a\\'' ; COMMIT; --'"],
        ["SELECT E'a'\n'\\' ; COMMIT ; --' ; COMMIT"],
    ],
    ids=["carriage-return", "dollar-in-a-name", "backslash-quote", "continued-escape-string"],
)
def test_sql_the_old_reading_let_through_commits_nothing(
    make_handler: Callable[..., DatabaseResourceHandler],
    res: Resource,
    db: Any,
    steps: list[str],
) -> None:
    handler = make_handler()
    handler.execute(res, "p", "INSERT INTO t VALUES ('until the plan ends')")
    for sql in steps[:-1]:
        handler.execute(res, "p", sql)
    with pytest.raises(ResourceError, match="more than one statement"):
        handler.execute(res, "p", steps[-1])
    assert _values(db) == []
    handler.rollback_plan("p")
    assert _values(db) == []


# Pieces of SQL whose reading is easy to get wrong: quotes of every kind,
# comments ended by CR or LF, nested comments, dollar quotes, names holding $.
_PIECES = [
    " ",
    "\n",
    "\r",
    "\t",
    ";",
    "--",
    "/*",
    "*/",
    "'",
    "''",
    "E'",
    "e'",
    "\\",
    "\\'",
    "$$",
    "$a$",
    "$é$",
    "$1",
    '"',
    '""',
    "U&'",
    'U&"',
    "X'",
    "B'",
    "\u00d7",
    "a",
    "E",
    "1",
    "1.",
    ".",
    ":",
    "-",
    "*",
    "/",
    "+",
    ",",
    "(",
    ")",
    "é",
    "x$",
    "$",
]
_LITERALS = st.sampled_from(
    [
        "'a;b'",
        "'--'",
        "'/*'",
        "E'\\';'",
        "E'a'\n';'",
        "$$;$$",
        "$q$ $$; $q$",
        "'it''s;'",
        '"c;""d"',
        "U&'\\0061;'",
        "X'1F'",
        "1",
        "\u00d7$a$",
        "B'0'",
        "e'\\\\'",
    ]
)
_GAPS = st.sampled_from([" ", "\n", " -- ;x\r", " -- ;x\n", " /* ; /* ; */ ; */ ", "\t", ""])


@st.composite
def _sql_texts(draw: st.DrawFn) -> str:
    """Mostly SELECTs of tricky literals between tricky gaps, sometimes loose pieces."""
    if draw(st.booleans()):
        statements = [
            f"SELECT {draw(_LITERALS)}{draw(_GAPS)}"
            for _ in range(draw(st.integers(min_value=1, max_value=3)))
        ]
        text = draw(_GAPS).join(statements) if len(statements) == 1 else ";".join(statements)
        return text + draw(st.sampled_from(["", ";", "; ;"]))
    return "SELECT 1 " + "".join(draw(st.lists(st.sampled_from(_PIECES), max_size=12)))


@pytest.fixture(scope="module")
def reader() -> Iterator[Any]:
    """A plain session that runs a text and says how many statements the server ran."""
    with _connect(os.environ[DSN_VARIABLE]) as conn:
        yield conn


def _server_statements(conn: Any, text: str, standard: bool) -> int | None:
    """Run *text* in a transaction rolled back after; return how many statements ran, or None."""
    conn.execute(f"SET standard_conforming_strings = {'on' if standard else 'off'}")
    pgconn = conn.pgconn
    pgconn.exec_(b"BEGIN")
    pgconn.send_query(text.encode())
    ran, failed = 0, False
    while (result := pgconn.get_result()) is not None:
        if result.status == psycopg.pq.ExecStatus.FATAL_ERROR:
            failed = True
        elif result.status in (psycopg.pq.ExecStatus.TUPLES_OK, psycopg.pq.ExecStatus.COMMAND_OK):
            ran += 1
    pgconn.exec_(b"ROLLBACK")
    return None if failed else ran


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_sql_texts(), standard=st.booleans())
def test_the_guard_counts_statements_as_the_server_runs_them(
    reader: Any, text: str, standard: bool
) -> None:
    ran = _server_statements(reader, text, standard)
    try:
        count, _ = pgsql.outline(text, standard_strings=standard)
    except pgsql.Unreadable:
        count = None
    if ran is not None:  # the server read it: so must the guard, the same way
        assert count == ran, (text, standard)


# -- a session the server ended never lets a plan commit elsewhere ------------------------


def _plan_on_both(
    handler: DatabaseResourceHandler, res: Resource, tmp_path: Path
) -> tuple[Resource, int]:
    """Start plan p on SQLite then PostgreSQL; return the SQLite resource and the backend pid."""
    notes = Resource(
        "notes", "database", engine="sqlite", location=str(tmp_path / "notes.db"), checkpoint_ttl=60
    )
    handler.execute(notes, "p", "CREATE TABLE n (v TEXT)")
    handler.execute(notes, "p", "INSERT INTO n VALUES ('sqlite')")
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('postgresql')")
        return notes, int(conn.info.backend_pid)


def _gone(db: Any, pid: int) -> bool:
    row = db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return bool(row == (0,))


def test_a_session_ended_while_the_plan_worked_elsewhere_commits_nothing_anywhere(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any, tmp_path: Path
) -> None:
    handler = make_handler()
    notes, pid = _plan_on_both(handler, res, tmp_path)
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert eventually(lambda: _gone(db, pid))
    handler.execute(notes, "p", "INSERT INTO n VALUES ('later')")  # the plan goes on elsewhere
    with pytest.raises(ResourceError, match="nothing was committed: the server ended") as caught:
        handler.release_plan("p")
    assert not isinstance(caught.value, PartialCommitError)
    assert _sqlite_tables(tmp_path / "notes.db") == []
    assert _values(db) == []
    stats = handler.stats()
    assert (stats.commits, stats.rollbacks, stats.open_connections) == (0, 1, 1)


def test_the_idle_backstop_ending_a_busy_plans_session_commits_nothing_anywhere(
    make_handler: Callable[..., DatabaseResourceHandler],
    pg_dsn: str,
    db: Any,
    tmp_path: Path,
) -> None:
    # checkpoint_ttl 0.2s: the server's backstop ends the PostgreSQL session once it
    # sat idle in the plan's transaction for 0.2 * 1.25 + 5 s, while the plan,
    # busy on SQLite all along, is never idle long enough for the reaper.
    res = Resource("inv", "database", engine="postgresql", dsn=pg_dsn, checkpoint_ttl=0.2)
    handler = make_handler()
    notes, pid = _plan_on_both(handler, res, tmp_path)
    deadline = time.monotonic() + 30
    while not _gone(db, pid):
        assert time.monotonic() < deadline, "the server's backstop never ended the session"
        handler.execute(notes, "p", "SELECT 1")
        time.sleep(0.05)
    with pytest.raises(ResourceError, match="nothing was committed: the server ended") as caught:
        handler.release_plan("p")
    assert not isinstance(caught.value, PartialCommitError)
    assert _sqlite_tables(tmp_path / "notes.db") == []
    assert _values(db) == []
    assert handler.stats().reaped == 0


def test_a_session_idle_for_its_checkpoint_ttl_is_asked_before_any_commit(
    pg_dsn: str, db: Any
) -> None:
    engine = postgresql_module.PostgreSQLEngine()
    settings = postgresql_module.PostgreSQLSettings(
        engine="postgresql", dsn=pg_dsn, checkpoint_ttl=0.2
    )
    conn = engine.open(settings, application_name="unused")
    try:
        engine.begin(conn, settings, plan_id="p")
        pid = conn.info.backend_pid

        def last_query() -> str:
            row = db.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
            return str(row[0])

        assert engine.check_committable(conn) is None
        assert last_query().startswith("BEGIN")  # just used: no round trip
        time.sleep(0.3)  # idle for longer than checkpoint_ttl
        assert engine.check_committable(conn) is None
        assert last_query() == "SHOW cleveragents.transaction"  # asked, and still there
        engine.rollback(conn)
        assert engine.is_clean(conn)
    finally:
        engine.close(conn)


# -- busy and lost, from every way a lent session runs SQL --------------------------------


def _locked_row(db: Any, pg_dsn: str) -> Any:
    """Insert a row and return a session holding its lock (roll it back when done)."""
    db.execute("INSERT INTO t VALUES ('held')")
    holder = _connect(pg_dsn)
    holder.execute("BEGIN")
    holder.execute("SELECT * FROM t FOR UPDATE")
    return holder


def _via_stream(conn: Any) -> None:
    list(conn.cursor().stream("SELECT * FROM t FOR UPDATE"))


def _via_copy(conn: Any) -> None:
    with conn.cursor().copy("COPY (SELECT * FROM t FOR UPDATE) TO STDOUT") as copy:
        list(copy)


def _via_fetch(conn: Any) -> None:
    cursor = conn.cursor("locking")
    cursor.execute("SELECT * FROM t FOR UPDATE")
    cursor.fetchall()


def _via_executemany(conn: Any) -> None:
    conn.cursor().executemany("UPDATE t SET v = %s", [("a",), ("b",)])


def _via_execute(conn: Any) -> None:
    conn.execute("UPDATE t SET v = 'x'")


_PATHS = [_via_stream, _via_copy, _via_fetch, _via_executemany, _via_execute]


@pytest.mark.parametrize("path", _PATHS)
def test_a_lock_wait_on_any_path_of_a_block_is_busy(
    make_handler: Callable[..., DatabaseResourceHandler],
    res: Resource,
    db: Any,
    pg_dsn: str,
    path: Callable[[Any], None],
) -> None:
    holder = _locked_row(db, pg_dsn)
    handler = make_handler()
    try:
        with pytest.raises(ResourceBusyError) as caught, handler.connection(res, "p") as conn:
            path(conn)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert isinstance(caught.value.__cause__, psycopg.errors.LockNotAvailable)
    handler.rollback_plan("p")


@pytest.mark.parametrize("path", _PATHS)
def test_a_session_lost_on_any_path_of_a_block_expires_the_plan(
    make_handler: Callable[..., DatabaseResourceHandler],
    res: Resource,
    db: Any,
    path: Callable[[Any], None],
) -> None:
    db.execute("INSERT INTO t VALUES ('row')")
    handler = make_handler()
    with handler.connection(res, "p") as conn:
        pid = conn.info.backend_pid
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert eventually(lambda: _gone(db, pid))
    with pytest.raises(CheckpointExpiredError) as caught, handler.connection(res, "p") as conn:
        path(conn)
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    with pytest.raises(ResourceError, match="server ended"):
        handler.release_plan("p")
    assert _values(db) == ["row"]


# -- more ways a plan leaves its session, and what becomes of that session -----------------


def test_sql_that_does_not_decode_or_comes_by_psycopgs_command_path_is_read_too(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler()
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('kept')")
        with pytest.raises(ResourceError, match="does not decode in the session's client encoding"):
            conn.cursor().execute(b"SELECT '\xff'; COMMIT")
        with pytest.raises(ResourceError, match="plans may not run ROLLBACK"):
            conn.wait(conn._exec_command("ROLLBACK"))  # psycopg's own command path
        conn.cursor_factory = conn.cursor_factory  # guarded already: kept as it is
        with pytest.raises(ResourceError, match="plans may not run COMMIT"):
            conn.execute("COMMIT")
    handler.release_plan("p")
    assert _values(db) == ["kept"]


def test_a_commit_that_fails_commits_nothing_and_the_session_is_reused(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    db.execute("CREATE TABLE u (k INT UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    handler = make_handler(max_connections=1)
    handler.execute(res, "p", "INSERT INTO t VALUES ('never')")
    handler.execute(res, "p", "INSERT INTO u VALUES (1), (1)")  # checked at COMMIT
    handler.execute(res, "p", "PREPARE leftover AS SELECT 1")
    with pytest.raises(ResourceError, match="duplicate key") as caught:
        handler.release_plan("p")
    assert isinstance(caught.value.__cause__, psycopg.errors.UniqueViolation)
    assert _values(db) == []
    assert handler.stats().idle_connections == 1  # reset, so pooled again
    assert handler.execute(res, "next", "SELECT count(*) FROM pg_prepared_statements") == [(0,)]
    handler.release_plan("next")


def test_a_stream_left_running_poisons_the_plan_and_its_session_is_closed(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler(max_connections=1)
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('never')")
        rows = conn.cursor().stream("SELECT generate_series(1, 100000)")
        next(rows)  # the block ends with the statement still sending rows
    with pytest.raises(ResourceError, match="still running on its session"):
        handler.execute(res, "p", "SELECT 1")
    with pytest.raises(ResourceError, match="nothing was committed"):
        handler.release_plan("p")
    del rows
    assert _values(db) == []
    assert handler.stats().open_connections == 0  # closed, never pooled
    handler.execute(res, "next", "INSERT INTO t VALUES ('next')")
    handler.release_plan("next")
    assert _values(db) == ["next"]


def test_a_pipeline_left_open_poisons_the_plan_and_its_session_is_closed(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler(max_connections=1)
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('never')")
        pipeline = conn.pipeline()
        pipeline.__enter__()  # never left
    with pytest.raises(ResourceError, match="left its session in pipeline mode"):
        handler.release_plan("p")
    del pipeline
    assert _values(db) == []
    assert handler.stats().open_connections == 0


def test_a_session_whose_guard_a_plan_switched_off_is_not_pooled(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler(max_connections=1)
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('kept')")
        conn.handler_statement = True  # the guard lets everything through from now on
    handler.release_plan("p")
    assert _values(db) == ["kept"]
    assert handler.stats().open_connections == 0  # closed: the next plan gets a guarded one
    with handler.connection(res, "next") as conn, pytest.raises(ResourceError):
        conn.execute("COMMIT")
    handler.rollback_plan("next")


def test_notifications_a_plan_received_do_not_reach_the_next_plan(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource
) -> None:
    handler = make_handler(max_connections=1)
    handler.execute(res, "p", "LISTEN news")
    handler.execute(res, "p", "NOTIFY news, 'private to p'")
    handler.release_plan("p")  # the session hears its own notification as it commits
    with handler.connection(res, "next") as conn:
        assert list(conn.notifies(timeout=0.2)) == []
    handler.rollback_plan("next")


def test_a_reset_that_fails_after_the_commit_keeps_the_commit_and_closes_the_session(
    make_handler: Callable[..., DatabaseResourceHandler],
    res: Resource,
    db: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(postgresql_module, "_RESET_SESSION", "SELECT 1 / 0")
    handler = make_handler()
    handler.execute(res, "p", "INSERT INTO t VALUES ('committed')")
    with caplog.at_level(logging.INFO, logger=postgresql_module.__name__):
        handler.release_plan("p")  # the COMMIT worked: no error for the plan
    assert _values(db) == ["committed"]
    assert handler.stats().commits == 1
    assert handler.stats().open_connections == 0  # not pooled: it may hold the plan's state
    assert "resetting a session failed" in caplog.text


def test_the_engine_tells_a_transaction_ended_around_it_and_an_unfinished_session(
    pg_dsn: str,
) -> None:
    engine = postgresql_module.PostgreSQLEngine()
    settings = postgresql_module.PostgreSQLSettings(engine="postgresql", dsn=pg_dsn)
    conn = engine.open(settings, application_name="unused")
    try:
        conn.pgconn.exec_(b"BEGIN")  # a transaction the handler did not begin
        assert not engine.is_clean(conn)
        conn.pgconn.exec_(b"ROLLBACK")
        assert engine.is_clean(conn)
        engine.begin(conn, settings, plan_id="p")
        assert engine.check_committable(conn) is None
        conn.pgconn.exec_(b"COMMIT")
        assert engine.check_committable(conn) == postgresql_module._GONE_BY_PLAN
        engine.rollback(conn)  # nothing to roll back
        assert not engine.is_clean(conn)
    finally:
        engine.close(conn)


def test_a_plan_whose_session_died_gets_expired_on_every_later_call(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler()
    with handler.connection(res, "p") as conn:
        pid = conn.info.backend_pid
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert eventually(lambda: _gone(db, pid))
    for label in ("first", "second"):  # the first learns of it, the second finds it closed
        with pytest.raises(CheckpointExpiredError):
            handler.create_checkpoint(res, "p", label)
    handler.rollback_plan("p")


def test_psycopgs_prepared_statements_serve_later_plans_and_stay_in_step_with_the_server(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    # One session: a statement run often enough is prepared by psycopg and kept
    # for the next plans; a rollback, or a plan that PREPAREs statements of its
    # own, deallocates everything, and psycopg is told so.
    handler = make_handler(max_connections=1)
    insert = "INSERT INTO t VALUES (:v)"
    count = "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql"
    for n in range(6):
        handler.execute(res, f"p{n}", insert, {"v": f"a{n}"})
        handler.release_plan(f"p{n}")
    handler.execute(res, "again", insert, {"v": "b"})  # prepared, kept across commits
    assert handler.execute(res, "again", count) == [(1,)]
    handler.release_plan("again")
    handler.execute(res, "undone", insert, {"v": "never"})
    handler.rollback_plan("undone")  # deallocates, and psycopg forgets its names
    assert handler.execute(res, "after", count) == [(0,)]
    handler.execute(res, "after", insert, {"v": "e"})
    handler.release_plan("after")
    for n in range(6):
        handler.execute(res, f"q{n}", insert, {"v": f"c{n}"})
        if n == 3:
            handler.execute(res, f"q{n}", "PREPARE mine AS SELECT 1")
        handler.release_plan(f"q{n}")
    handler.execute(res, "last", insert, {"v": "d"})
    left = "SELECT count(*) FROM pg_prepared_statements WHERE from_sql"
    assert handler.execute(res, "last", left) == [(0,)]
    handler.release_plan("last")
    assert len(_values(db)) == 6 + 1 + 1 + 6 + 1


def test_ctrl_c_in_the_commit_message_after_the_commit_is_counted_and_the_session_reset(
    make_handler: Callable[..., DatabaseResourceHandler],
    res: Resource,
    db: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler = make_handler(max_connections=2)
    handler.execute(res, "p", "INSERT INTO t VALUES ('committed')")
    handler.execute(res, "p", "SELECT set_config('lock_timeout', '0', false)")
    notes = Resource("notes", "database", engine="sqlite", location=str(tmp_path / "notes.db"))
    handler.execute(notes, "p", "CREATE TABLE n (v TEXT)")
    engine = handler._resolver.engines["postgresql"]
    real_results = engine._results_of

    def results_then_ctrl_c(pgconn: Any) -> Any:
        results = yield from real_results(pgconn)
        if any(result.command_status == b"COMMIT" for result in results):
            raise KeyboardInterrupt  # the server ran the whole message; the client was interrupted
        return results

    monkeypatch.setattr(engine, "_results_of", results_then_ctrl_c)
    with pytest.raises(PartialCommitError) as caught:
        handler.release_plan("p")
    monkeypatch.undo()
    assert caught.value.committed == ["inv"]  # PostgreSQL first, then SQLite, never committed
    assert isinstance(caught.value.__cause__, KeyboardInterrupt)
    assert _values(db) == ["committed"]
    assert _sqlite_tables(tmp_path / "notes.db") == []
    # The session was reset after all, and pooled: the next plan gets the handler's lock_timeout.
    assert handler.execute(res, "next", "SHOW lock_timeout") == [("500ms",)]
    handler.rollback_plan("next")
