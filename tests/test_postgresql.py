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

from cleveragents.errors import (
    CheckpointEvictedError,
    CheckpointExpiredError,
    CleverAgentsError,
    PoolExhaustedError,
    ResourceBusyError,
    ResourceError,
)
from cleveragents.hookspecs import hookimpl
from cleveragents.plugins import get_plugin_manager
from cleveragents.resource import Resource
from cleveragents.resource.handlers import _finalize as finalize_module
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


def _wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


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


def test_idle_sessions_are_reused_and_bounded(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler(max_connections=2)
    pids = set()
    for n in range(5):
        with handler.connection(res, f"p{n}") as conn:
            pids.add(conn.info.backend_pid)
        handler.release_plan(f"p{n}")
    assert len(pids) == 1
    assert handler.stats().idle_connections == 1


# -- busy: locks, deadlocks ------------------------------------------------------------


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
    assert _wait_until(lambda: _backends(db) == 0), "sessions of earlier tests are still open"
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


def test_evict_lru_rolls_back_the_oldest_postgresql_plan(
    make_handler: Callable[..., DatabaseResourceHandler], res: Resource, db: Any
) -> None:
    handler = make_handler(max_connections=1, on_full="evict_lru")
    handler.execute(res, "old", "INSERT INTO t VALUES ('old')")
    handler.execute(res, "new", "INSERT INTO t VALUES ('new')")
    with pytest.raises(CheckpointEvictedError):
        handler.execute(res, "old", "SELECT 1")
    handler.release_plan("new")
    assert _values(db) == ["new"]


# -- expiry: the reaper and the server's backstop ---------------------------------------


def test_the_reaper_rolls_back_an_idle_plan(
    make_handler: Callable[..., DatabaseResourceHandler], pg_dsn: str, db: Any
) -> None:
    res = Resource("inv", "database", engine="postgresql", dsn=pg_dsn, checkpoint_ttl=0.2)
    handler = make_handler()
    handler.create_checkpoint(res, "p1", "cp")
    handler.execute(res, "p1", "INSERT INTO t VALUES ('stale')")
    assert _wait_until(lambda: handler.stats().reaped == 1)
    with pytest.raises(CheckpointExpiredError, match="checkpoint_ttl"):
        handler.execute(res, "p1", "SELECT 1")
    assert _values(db) == []
    assert handler.stats().open_connections <= 1


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
    with pytest.raises(CheckpointExpiredError):
        handler.release_plan("p1")  # commits nothing: the server rolled it back
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
    assert _wait_until(
        lambda: (
            db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
            == (0,)
        )
    )
    # The client learns of it only now: COMMIT fails as an expired plan; ROLLBACK
    # has nothing left to do (the server rolled back), so it does not raise.
    if ending == "release_plan":
        with pytest.raises(CheckpointExpiredError):
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
    assert _wait_until(
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
        assert _wait_until(
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
    assert _wait_until(lambda: _backends(db) == 0)
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
    assert _wait_until(lambda: _backends(db) == 0)
    assert _values(db) == ["p0"]

    closing = DatabaseResourceHandler()
    closing.execute(res, "q", "INSERT INTO t VALUES ('q')")
    closing.close()
    closing.close()
    assert _wait_until(lambda: _backends(db) == 0)
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
    monkeypatch.setattr(postgresql_module, "_refusal", lambda sql: None)
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
    assert _wait_until(lambda: _backends(db) == 0)

    for number in range(4):
        handler.execute(res, f"new {number}", f"INSERT INTO t VALUES ('new {number}')")
        handler.release_plan(f"new {number}")
    assert _values(db) == [f"new {number}" for number in range(4)]
    assert handler.stats().open_connections <= 4
