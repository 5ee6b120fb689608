"""Faults injected at the engine seam: every error path leaves no plan and no lent connection.

Each engine method can be made to fail on demand with one of the engine's own
driver errors; the handler must wrap it (or pass a non-driver error through),
end what it must and lend nothing it should not.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from engine_faults import EngineFaults, error_context, make_driver_error, nothing_lent
from fakes import RecordingSubscriber

from cleveragents.errors import (
    CheckpointError,
    CheckpointExpiredError,
    PartialCommitError,
    ResourceBusyError,
    ResourceError,
)
from cleveragents.plan import Plan, ResourceEntry, Step
from cleveragents.plugins import get_plugin_manager
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import ENGINES, DatabaseResourceHandler
from cleveragents.runtime import Runtime

from .conftest import Database

MakeHandler = Callable[..., DatabaseResourceHandler]


@pytest.fixture
def faults(engine: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[EngineFaults]:
    made = EngineFaults(engine, monkeypatch)
    yield made
    made.restore()


@pytest.fixture
def driver_error(engine: str) -> type[BaseException]:
    """Return the engine's driver error class (what the handler wraps)."""
    return ENGINES[engine].driver_error if engine == "sqlite" else _psycopg_error()


def _psycopg_error() -> type[BaseException]:
    error: type[BaseException] = pytest.importorskip("psycopg").Error
    return error


def _insert(handler: DatabaseResourceHandler, resource: Resource, plan_id: str, value: str) -> Any:
    """Insert *value* in a connection() block of the plan; return the connection it was lent."""
    with handler.connection(resource, plan_id) as conn:
        conn.execute(f"INSERT INTO t VALUES ('{value}')")
        return conn


# -- savepoints ------------------------------------------------------------------------


def test_a_failing_first_savepoint_leaves_nothing_behind(
    handler: DatabaseResourceHandler,
    db: Database,
    faults: EngineFaults,
    driver_error: type[BaseException],
) -> None:
    faults.fail("savepoint")
    with pytest.raises(ResourceError) as info:
        handler.create_checkpoint(db.resource(), "p1", "before")
    error = info.value
    assert type(error) is ResourceError
    assert error_context(error) == ("p1", "before", "db", "create_checkpoint")
    assert isinstance(error.__cause__, driver_error)
    assert "disk I/O error in savepoint" in str(error)
    nothing_lent(handler)
    faults.restore()
    # The write turn (SQLite) was given back: another plan gets it at once.
    quick = db.resource(busy_timeout=0.1)
    assert handler.create_checkpoint(quick, "p2", "a").depth == 1


def test_a_failing_later_savepoint_keeps_the_plan(
    handler: DatabaseResourceHandler, db: Database, faults: EngineFaults
) -> None:
    resource = db.resource()
    handler.create_checkpoint(resource, "p1", "first")
    _insert(handler, resource, "p1", "kept")
    faults.fail("savepoint")
    with pytest.raises(ResourceError) as info:
        handler.create_checkpoint(resource, "p1", "second")
    assert error_context(info.value) == ("p1", "second", "db", "create_checkpoint")
    faults.restore()
    assert handler.stats().checkpoints == 1
    handler.create_checkpoint(resource, "p1", "second")  # the label was never taken
    handler.release_plan("p1")
    assert db.rows() == ["kept"]


def test_a_non_driver_error_in_a_savepoint_passes_through_unwrapped(
    handler: DatabaseResourceHandler, db: Database, faults: EngineFaults
) -> None:
    faults.fail("savepoint", MemoryError("out of memory"))
    with pytest.raises(MemoryError):
        handler.create_checkpoint(db.resource(), "p1", "a")
    nothing_lent(handler)


def test_rollback_to_failing_keeps_the_plan_and_its_checkpoints(
    handler: DatabaseResourceHandler,
    db: Database,
    faults: EngineFaults,
    driver_error: type[BaseException],
) -> None:
    resource = db.resource()
    handler.create_checkpoint(resource, "p1", "first")
    handler.create_checkpoint(resource, "p1", "second")
    _insert(handler, resource, "p1", "after second")
    faults.fail("rollback_to")
    with pytest.raises(ResourceError) as info:
        handler.rollback_to(resource, "p1", "first")
    assert error_context(info.value) == ("p1", "first", "db", "rollback_to")
    assert isinstance(info.value.__cause__, driver_error)
    faults.restore()
    nothing_lent(handler, plans=1)
    assert handler.stats().checkpoints == 2
    handler.rollback_to(resource, "p1", "second")
    handler.release_plan("p1")
    assert db.rows() == []


# -- commit -------------------------------------------------------------------------------


def test_a_failing_commit_rolls_the_plan_back(
    handler: DatabaseResourceHandler,
    db: Database,
    faults: EngineFaults,
    driver_error: type[BaseException],
) -> None:
    resource = db.resource()
    handler.create_checkpoint(resource, "p1", "a")
    _insert(handler, resource, "p1", "never committed")
    faults.fail("commit")
    with pytest.raises(ResourceError) as info:
        handler.release_plan("p1")
    error = info.value
    assert type(error) is ResourceError
    assert error_context(error) == ("p1", None, "db", "commit")
    assert isinstance(error.__cause__, driver_error)
    faults.restore()
    assert db.rows() == []
    nothing_lent(handler)
    stats = handler.stats()
    assert (stats.commits, stats.rollbacks) == (0, 1)
    handler.release_plan("p1")  # it is gone: nothing to do


def test_a_commit_failing_on_the_second_database_is_a_partial_commit(
    handler: DatabaseResourceHandler,
    make_db: Callable[[str], Database],
    faults: EngineFaults,
    driver_error: type[BaseException],
) -> None:
    databases = [make_db(name) for name in ("first", "second", "third")]
    lent = [
        _insert(handler, database.resource(name), "p1", f"into {name}")
        for database, name in zip(databases, ("first", "second", "third"), strict=True)
    ]
    faults.fail("commit", when=lambda conn: conn is lent[1])
    with pytest.raises(PartialCommitError) as info:
        handler.release_plan("p1")
    error = info.value
    assert error.committed == ["first"]
    assert error_context(error) == ("p1", None, "second", "commit")
    assert "['first'] were committed" in str(error)
    assert type(error.__cause__) is ResourceError
    assert isinstance(error.__cause__.__cause__, driver_error)
    assert [database.rows() for database in databases] == [["into first"], [], []]
    nothing_lent(handler)


def test_a_failed_commit_is_reported_as_a_failed_plan(
    db: Database, engine: str, faults: EngineFaults
) -> None:
    listener = RecordingSubscriber("listener")
    pm = get_plugin_manager(load_entry_points=False)
    pm.register(listener, name="listener")
    key = "location" if engine == "sqlite" else "dsn"
    plan = Plan(
        id="p1",
        resources={"inv": ResourceEntry(kind="database", engine=engine, **{key: db.where})},
        steps=[Step(id="a", resource="inv", sql="INSERT INTO t VALUES ('x')")],
    )
    faults.fail("commit")
    with Runtime(plugin_manager=pm) as runtime:
        result = runtime.run(plan)
    assert result.status == "failed"
    assert result.failed_step is None
    assert result.error is not None and "operation 'commit'" in result.error
    assert listener.log == [
        "listener started p1",
        f"listener failed p1: ResourceError: {result.error}",
    ]
    assert db.rows() == []


def test_a_plan_that_was_never_committable_is_rolled_back(
    handler: DatabaseResourceHandler,
    db: Database,
    engine: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _insert(handler, db.resource(), "p1", "x")
    monkeypatch.setattr(ENGINES[engine], "check_committable", lambda self, conn: "aborted")
    with pytest.raises(ResourceError, match="nothing was committed: aborted") as info:
        handler.release_plan("p1")
    assert info.value.operation == "commit"
    assert db.rows() == []
    nothing_lent(handler)


def test_a_non_driver_error_while_committing_still_rolls_back(
    handler: DatabaseResourceHandler, db: Database, faults: EngineFaults
) -> None:
    _insert(handler, db.resource(), "p1", "never committed")
    faults.fail("commit", RuntimeError("the driver broke"))
    with pytest.raises(RuntimeError, match="the driver broke"):
        handler.release_plan("p1")
    faults.restore()
    assert db.rows() == []
    nothing_lent(handler)


# -- rollback --------------------------------------------------------------------------------


def test_a_failing_rollback_closes_the_connection(
    handler: DatabaseResourceHandler,
    db: Database,
    engine: str,
    faults: EngineFaults,
    driver_error: type[BaseException],
    file_fds: Callable[..., int],
) -> None:
    resource = db.resource()
    handler.create_checkpoint(resource, "p1", "a")
    _insert(handler, resource, "p1", "never committed")
    faults.fail("rollback")
    with pytest.raises(ResourceError) as info:
        handler.rollback_plan("p1")
    assert error_context(info.value) == ("p1", None, "db", "rollback")
    assert isinstance(info.value.__cause__, driver_error)
    faults.restore()
    stats = handler.stats()
    assert (stats.active_plans, stats.open_connections, stats.rollbacks) == (0, 0, 1)
    if engine == "sqlite":
        assert file_fds(db.where) == 0  # a connection in an unknown state is never lent again
    assert db.rows() == []


def test_a_failing_rollback_during_a_failed_commit(
    handler: DatabaseResourceHandler,
    db: Database,
    engine: str,
    faults: EngineFaults,
    file_fds: Callable[..., int],
) -> None:
    _insert(handler, db.resource(), "p1", "never committed")
    faults.fail("commit")
    faults.fail("rollback")
    with pytest.raises(ResourceError) as info:
        handler.release_plan("p1")
    assert info.value.operation == "commit"  # the first error is the one reported
    faults.restore()
    assert handler.stats().open_connections == 0
    if engine == "sqlite":
        assert file_fds(db.where) == 0
    assert db.rows() == []


def test_a_rollback_failing_while_abandoning_a_new_lease(
    handler: DatabaseResourceHandler,
    db: Database,
    engine: str,
    faults: EngineFaults,
    file_fds: Callable[..., int],
) -> None:
    faults.fail("savepoint")
    faults.fail("rollback")
    with pytest.raises(ResourceError) as info:
        handler.create_checkpoint(db.resource(), "p1", "a")
    assert info.value.operation == "create_checkpoint"
    faults.restore()
    stats = handler.stats()
    assert (stats.active_plans, stats.open_connections) == (0, 0)
    if engine == "sqlite":
        assert file_fds(db.where) == 0


def test_close_goes_on_when_a_rollback_fails(
    db: Database,
    make_db: Callable[[str], Database],
    faults: EngineFaults,
    caplog: pytest.LogCaptureFixture,
    fd_count: Callable[..., int],
) -> None:
    other = make_db("other")
    baseline = fd_count()
    handler = DatabaseResourceHandler(max_connections=4)
    failing = _insert(handler, db.resource(), "p1", "x")
    _insert(handler, other.resource("other"), "p2", "y")
    faults.fail("rollback", when=lambda conn: conn is failing)
    with caplog.at_level(logging.WARNING):
        handler.close()
    faults.restore()
    assert "rollback failed" in caplog.text
    assert handler.stats().open_connections == 0
    assert fd_count() == baseline
    assert db.rows() == []
    assert other.rows() == []


def test_the_reaper_survives_a_failing_rollback(
    handler: DatabaseResourceHandler,
    db: Database,
    make_db: Callable[[str], Database],
    faults: EngineFaults,
) -> None:
    other = make_db("other")
    failing: list[Any] = []
    faults.fail("rollback", when=lambda conn: conn in failing)
    failing.append(_insert(handler, db.resource(checkpoint_ttl="100ms"), "p1", "x"))
    deadline = time.monotonic() + 10
    while handler.stats().reaped < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    faults.restore()
    with pytest.raises(CheckpointExpiredError):
        handler.rollback_plan("p1")
    _insert(handler, other.resource("other", checkpoint_ttl="100ms"), "p2", "y")
    while handler.stats().reaped < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler.stats().reaped == 2
    assert db.rows() == []
    assert other.rows() == []
    nothing_lent(handler)


# -- open, SQL, close ------------------------------------------------------------------------


@pytest.mark.parametrize(("busy", "expected"), [(False, ResourceError), (True, ResourceBusyError)])
def test_a_failing_open_frees_its_slot(
    make_handler: MakeHandler,
    db: Database,
    engine: str,
    faults: EngineFaults,
    busy: bool,
    expected: type[ResourceError],
) -> None:
    handler = make_handler(max_connections=1, acquire_timeout="100ms")
    error = make_driver_error(engine, "unable to open database file", busy=busy)
    faults.fail("open", error)
    with pytest.raises(ResourceError) as info:
        handler.create_checkpoint(db.resource(), "p1", "a")
    assert type(info.value) is expected
    assert error_context(info.value) == ("p1", None, "db", "open")
    assert info.value.__cause__ is error
    assert handler.stats().open_connections == 0
    nothing_lent(handler)
    faults.restore()
    handler.create_checkpoint(db.resource(), "p2", "a")  # the one slot is free: no waiting
    assert handler.stats().wait_timeouts == 0


def test_a_non_driver_error_while_opening_passes_through_and_frees_the_slot(
    make_handler: MakeHandler, db: Database, faults: EngineFaults
) -> None:
    handler = make_handler(max_connections=1, acquire_timeout="100ms")
    faults.fail("open", KeyError("surprise"))
    with pytest.raises(KeyError):
        handler.create_checkpoint(db.resource(), "p1", "a")
    faults.restore()
    nothing_lent(handler)
    assert handler.stats().open_connections == 0
    handler.create_checkpoint(db.resource(), "p2", "a")


def test_a_locked_error_from_sql_is_busy_but_other_sql_errors_stay_the_drivers(
    handler: DatabaseResourceHandler,
    db: Database,
    engine: str,
    faults: EngineFaults,
    driver_error: type[BaseException],
) -> None:
    resource = db.resource()
    with pytest.raises(driver_error, match=r"no such table|missing") as missing:
        handler.execute(resource, "p1", "SELECT * FROM missing")
    assert not isinstance(missing.value, ResourceError)
    if engine == "postgresql":
        handler.rollback_plan("p1")  # PostgreSQL aborted the transaction: start afresh
    faults.fail("execute", make_driver_error(engine, "lock wait", busy=True))
    with pytest.raises(ResourceBusyError) as info:
        handler.execute(resource, "p1", "SELECT 1")
    assert error_context(info.value) == ("p1", None, "db", "execute")
    faults.restore()
    assert handler.execute(resource, "p1", "SELECT count(*) FROM t") == [(0,)]
    handler.rollback_plan("p1")


def test_close_failures_are_counted(
    make_handler: MakeHandler,
    db: Database,
    engine: str,
    faults: EngineFaults,
    caplog: pytest.LogCaptureFixture,
    file_fds: Callable[..., int],
) -> None:
    handler = make_handler(max_connections=2, idle_timeout="100ms")
    resource = db.resource()
    failure = sqlite3.ProgrammingError if engine == "sqlite" else faults.error
    faults.fail("close", failure("close failed"), after_real_call=True)
    _insert(handler, resource, "p1", "x")
    handler.release_plan("p1")  # its connection goes idle, then idle_timeout closes it
    deadline = time.monotonic() + 10
    while handler.stats().close_failures < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler.stats().close_failures == 1
    _insert(handler, resource, "p2", "y")
    handler.release_plan("p2")
    with caplog.at_level(logging.WARNING):
        handler.close()  # the idle connection fails to close as well
    assert handler.stats().close_failures == 2
    assert "closing a connection to" in caplog.text
    assert handler.stats().open_connections == 0
    if engine == "sqlite":
        assert file_fds(db.where) == 0


# -- labels ------------------------------------------------------------------------------------


def test_a_label_used_twice_leaves_the_plan_as_it_was(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    resource = db.resource()
    handler.create_checkpoint(resource, "p1", "a")
    with pytest.raises(CheckpointError) as info:
        handler.create_checkpoint(resource, "p1", "a")
    assert error_context(info.value) == ("p1", "a", "db", "create_checkpoint")
    assert handler.stats().checkpoints == 1
    handler.rollback_plan("p1")
    nothing_lent(handler)


@pytest.mark.parametrize(
    ("plan_id", "checkpoint_id"),
    [("", "a"), ("p", ""), ("p\x00", "a"), ("p", "x" * 257), (None, "a"), ("p", 5)],
)
def test_bad_labels_are_refused_before_anything_happens(
    handler: DatabaseResourceHandler, db: Database, plan_id: Any, checkpoint_id: Any
) -> None:
    with pytest.raises(ValueError):
        handler.create_checkpoint(db.resource(), plan_id, checkpoint_id)
    assert handler.stats().open_connections == 0
    nothing_lent(handler)
