"""Faults injected at the engine seam: every error path leaves no plan and no lent connection."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
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
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.resource.handlers.sqlite import SQLiteEngine
from cleveragents.runtime import Runtime

MakeHandler = Callable[..., DatabaseResourceHandler]


class _Faults:
    """Make methods of SQLiteEngine fail on demand; counts the failures it caused."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self.raised: list[str] = []

    def fail(
        self,
        method: str,
        error: BaseException | None = None,
        *,
        when: Callable[..., bool] = lambda *args: True,
        after_real_call: bool = False,
    ) -> None:
        """Make ``SQLiteEngine.<method>`` raise *error* whenever ``when(*args)`` holds."""
        real = getattr(SQLiteEngine, method)
        raised = self.raised
        failure = error or sqlite3.OperationalError(f"disk I/O error in {method}")

        def failing(engine: SQLiteEngine, *args: Any, **kwargs: Any) -> Any:
            if not when(*args):
                return real(engine, *args, **kwargs)
            if after_real_call:
                real(engine, *args, **kwargs)
            raised.append(method)
            raise failure

        self._monkeypatch.setattr(SQLiteEngine, method, failing)

    def restore(self) -> None:
        self._monkeypatch.undo()


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Faults]:
    made = _Faults(monkeypatch)
    yield made
    made.restore()


def _file_of(conn: sqlite3.Connection) -> str:
    return str(conn.execute("PRAGMA database_list").fetchone()[2])


def _database(path: Path, name: str = "db", **options: Any) -> Resource:
    return Resource(name=name, kind="database", engine="sqlite", location=str(path), **options)


def _new_database(tmp_path: Path, name: str) -> tuple[Path, Resource]:
    path = tmp_path / f"{name}.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (v TEXT)")
    conn.close()
    return path, _database(path, name)


def _insert(handler: DatabaseResourceHandler, resource: Resource, plan_id: str, value: str) -> None:
    with handler.connection(resource, plan_id) as conn:
        conn.execute("INSERT INTO t VALUES (?)", (value,))


def _nothing_lent(handler: DatabaseResourceHandler, *, plans: int = 0) -> None:
    """Check that *plans* plans are open and no connection is lent to a plan that is not."""
    stats = handler.stats()
    assert stats.active_plans == plans
    if plans == 0:
        assert stats.open_connections == stats.idle_connections
        assert stats.checkpoints == 0


def _context(error: BaseException) -> tuple[Any, ...]:
    assert isinstance(error, ResourceError)
    return (error.plan_id, error.checkpoint_id, error.resource, error.operation)


# -- savepoints ------------------------------------------------------------------------


def test_a_failing_first_savepoint_leaves_nothing_behind(
    handler: DatabaseResourceHandler, resource: Resource, faults: _Faults
) -> None:
    faults.fail("savepoint")
    with pytest.raises(ResourceError) as info:
        handler.create_checkpoint(resource, "p1", "before")
    error = info.value
    assert type(error) is ResourceError
    assert _context(error) == ("p1", "before", "db", "create_checkpoint")
    assert isinstance(error.__cause__, sqlite3.OperationalError)
    assert "disk I/O error in savepoint" in str(error)
    _nothing_lent(handler)
    faults.restore()
    # The write turn was given back: another plan gets it at once.
    quick = Resource(**{"name": "db", "kind": "database", **resource.options, "busy_timeout": 0.1})
    assert handler.create_checkpoint(quick, "p2", "a").depth == 1


def test_a_failing_later_savepoint_keeps_the_plan(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, faults: _Faults, rows: Any
) -> None:
    handler.create_checkpoint(resource, "p1", "first")
    _insert(handler, resource, "p1", "kept")
    faults.fail("savepoint")
    with pytest.raises(ResourceError) as info:
        handler.create_checkpoint(resource, "p1", "second")
    assert _context(info.value) == ("p1", "second", "db", "create_checkpoint")
    faults.restore()
    assert handler.stats().checkpoints == 1
    handler.create_checkpoint(resource, "p1", "second")  # the label was never taken
    handler.release_plan("p1")
    assert rows(db_path, "SELECT v FROM t") == [("kept",)]


def test_a_non_driver_error_in_a_savepoint_passes_through_unwrapped(
    handler: DatabaseResourceHandler, resource: Resource, faults: _Faults
) -> None:
    faults.fail("savepoint", MemoryError("out of memory"))
    with pytest.raises(MemoryError):
        handler.create_checkpoint(resource, "p1", "a")
    _nothing_lent(handler)


def test_rollback_to_failing_keeps_the_plan_and_its_checkpoints(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, faults: _Faults, rows: Any
) -> None:
    handler.create_checkpoint(resource, "p1", "first")
    handler.create_checkpoint(resource, "p1", "second")
    _insert(handler, resource, "p1", "after second")
    faults.fail("rollback_to")
    with pytest.raises(ResourceError) as info:
        handler.rollback_to(resource, "p1", "first")
    assert _context(info.value) == ("p1", "first", "db", "rollback_to")
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    faults.restore()
    _nothing_lent(handler, plans=1)
    assert handler.stats().checkpoints == 2
    handler.rollback_to(resource, "p1", "second")
    handler.release_plan("p1")
    assert rows(db_path, "SELECT v FROM t") == []


# -- commit -------------------------------------------------------------------------------


def test_a_failing_commit_rolls_the_plan_back(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, faults: _Faults, rows: Any
) -> None:
    handler.create_checkpoint(resource, "p1", "a")
    _insert(handler, resource, "p1", "never committed")
    faults.fail("commit")
    with pytest.raises(ResourceError) as info:
        handler.release_plan("p1")
    error = info.value
    assert type(error) is ResourceError
    assert _context(error) == ("p1", None, "db", "commit")
    assert isinstance(error.__cause__, sqlite3.OperationalError)
    faults.restore()
    assert rows(db_path, "SELECT v FROM t") == []
    _nothing_lent(handler)
    stats = handler.stats()
    assert (stats.commits, stats.rollbacks) == (0, 1)
    handler.release_plan("p1")  # it is gone: nothing to do


def test_a_commit_failing_on_the_second_database_is_a_partial_commit(
    handler: DatabaseResourceHandler, tmp_path: Path, faults: _Faults, rows: Any
) -> None:
    first_path, first = _new_database(tmp_path, "first")
    second_path, second = _new_database(tmp_path, "second")
    third_path, third = _new_database(tmp_path, "third")
    for resource in (first, second, third):
        _insert(handler, resource, "p1", f"into {resource.name}")
    faults.fail("commit", when=lambda conn: _file_of(conn) == str(second_path))
    with pytest.raises(PartialCommitError) as info:
        handler.release_plan("p1")
    error = info.value
    assert error.committed == ["first"]
    assert _context(error) == ("p1", None, "second", "commit")
    assert "['first'] were committed" in str(error)
    assert type(error.__cause__) is ResourceError
    assert isinstance(error.__cause__.__cause__, sqlite3.OperationalError)
    assert rows(first_path, "SELECT v FROM t") == [("into first",)]
    assert rows(second_path, "SELECT v FROM t") == []
    assert rows(third_path, "SELECT v FROM t") == []
    _nothing_lent(handler)


def test_a_failed_commit_is_reported_as_a_failed_plan(
    db_path: Path, faults: _Faults, rows: Any
) -> None:
    listener = RecordingSubscriber("listener")
    pm = get_plugin_manager(load_entry_points=False)
    pm.register(listener, name="listener")
    plan = Plan(
        id="p1",
        resources={"inv": ResourceEntry(kind="database", engine="sqlite", location=str(db_path))},
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
    assert rows(db_path, "SELECT v FROM t") == []


def test_a_plan_that_was_never_committable_is_rolled_back(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, faults: _Faults, rows: Any
) -> None:
    _insert(handler, resource, "p1", "x")
    faults._monkeypatch.setattr(SQLiteEngine, "check_committable", lambda self, conn: "aborted")
    with pytest.raises(ResourceError, match="nothing was committed: aborted") as info:
        handler.release_plan("p1")
    assert info.value.operation == "commit"
    assert rows(db_path, "SELECT v FROM t") == []
    _nothing_lent(handler)


# -- rollback --------------------------------------------------------------------------------


def test_a_failing_rollback_closes_the_connection(
    handler: DatabaseResourceHandler,
    resource: Resource,
    db_path: Path,
    faults: _Faults,
    rows: Any,
    file_fds: Callable[..., int],
) -> None:
    handler.create_checkpoint(resource, "p1", "a")
    _insert(handler, resource, "p1", "never committed")
    faults.fail("rollback")
    with pytest.raises(ResourceError) as info:
        handler.rollback_plan("p1")
    assert _context(info.value) == ("p1", None, "db", "rollback")
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    faults.restore()
    stats = handler.stats()
    assert (stats.active_plans, stats.open_connections, stats.rollbacks) == (0, 0, 1)
    assert file_fds(db_path) == 0  # a connection in an unknown state is never lent again
    assert rows(db_path, "SELECT v FROM t") == []


def test_a_failing_rollback_during_a_failed_commit(
    handler: DatabaseResourceHandler,
    resource: Resource,
    db_path: Path,
    faults: _Faults,
    rows: Any,
    file_fds: Callable[..., int],
) -> None:
    _insert(handler, resource, "p1", "never committed")
    faults.fail("commit")
    faults.fail("rollback")
    with pytest.raises(ResourceError) as info:
        handler.release_plan("p1")
    assert info.value.operation == "commit"  # the first error is the one reported
    faults.restore()
    assert handler.stats().open_connections == 0
    assert file_fds(db_path) == 0
    assert rows(db_path, "SELECT v FROM t") == []


def test_a_rollback_failing_while_abandoning_a_new_lease(
    handler: DatabaseResourceHandler,
    resource: Resource,
    db_path: Path,
    faults: _Faults,
    file_fds: Callable[..., int],
) -> None:
    faults.fail("savepoint")
    faults.fail("rollback")
    with pytest.raises(ResourceError) as info:
        handler.create_checkpoint(resource, "p1", "a")
    assert info.value.operation == "create_checkpoint"
    faults.restore()
    stats = handler.stats()
    assert (stats.active_plans, stats.open_connections) == (0, 0)
    assert file_fds(db_path) == 0


def test_close_goes_on_when_a_rollback_fails(
    resource: Resource,
    db_path: Path,
    tmp_path: Path,
    faults: _Faults,
    rows: Any,
    caplog: pytest.LogCaptureFixture,
    fd_count: Callable[..., int],
) -> None:
    baseline = fd_count()
    other_path, other = _new_database(tmp_path, "other")
    handler = DatabaseResourceHandler(max_connections=4)
    _insert(handler, resource, "p1", "x")
    _insert(handler, other, "p2", "y")
    faults.fail("rollback", when=lambda conn: _file_of(conn) == str(db_path))
    with caplog.at_level(logging.WARNING):
        handler.close()
    faults.restore()
    assert "rollback failed" in caplog.text
    assert handler.stats().open_connections == 0
    assert fd_count() == baseline
    assert rows(db_path, "SELECT v FROM t") == []
    assert rows(other_path, "SELECT v FROM t") == []


def test_the_reaper_survives_a_failing_rollback(
    handler: DatabaseResourceHandler, db_path: Path, tmp_path: Path, faults: _Faults, rows: Any
) -> None:
    hasty = _database(db_path, checkpoint_ttl="100ms")
    faults.fail("rollback", when=lambda conn: _file_of(conn) == str(db_path))
    _insert(handler, hasty, "p1", "x")
    deadline = time.monotonic() + 10
    while handler.stats().reaped < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    faults.restore()
    with pytest.raises(CheckpointExpiredError):
        handler.rollback_plan("p1")
    other_path, _ = _new_database(tmp_path, "other")
    _insert(handler, _database(other_path, "other", checkpoint_ttl="100ms"), "p2", "y")
    while handler.stats().reaped < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler.stats().reaped == 2
    assert rows(db_path, "SELECT v FROM t") == []
    assert rows(other_path, "SELECT v FROM t") == []
    _nothing_lent(handler)


# -- open, begin, close ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (sqlite3.OperationalError("unable to open database file"), ResourceError),
        (sqlite3.OperationalError("database is locked"), ResourceBusyError),
    ],
)
def test_a_failing_open_frees_its_slot(
    make_handler: MakeHandler,
    resource: Resource,
    faults: _Faults,
    error: BaseException,
    expected: type[ResourceError],
) -> None:
    handler = make_handler(max_connections=1, acquire_timeout="100ms")
    faults.fail("open", error)
    with pytest.raises(ResourceError) as info:
        handler.create_checkpoint(resource, "p1", "a")
    assert type(info.value) is expected
    assert _context(info.value) == ("p1", None, "db", "open")
    assert info.value.__cause__ is error
    assert handler.stats().open_connections == 0
    _nothing_lent(handler)
    faults.restore()
    handler.create_checkpoint(resource, "p2", "a")  # the one slot is free: no waiting
    assert handler.stats().wait_timeouts == 0


def test_a_non_driver_error_while_opening_passes_through_and_frees_the_slot(
    make_handler: MakeHandler, resource: Resource, faults: _Faults
) -> None:
    handler = make_handler(max_connections=1, acquire_timeout="100ms")
    faults.fail("open", KeyError("surprise"))
    with pytest.raises(KeyError):
        handler.create_checkpoint(resource, "p1", "a")
    faults.restore()
    _nothing_lent(handler)
    assert handler.stats().open_connections == 0
    handler.create_checkpoint(resource, "p2", "a")


def test_a_real_pragma_failure_while_opening_closes_the_new_connection(
    make_handler: MakeHandler,
    tmp_path: Path,
    fd_count: Callable[..., int],
) -> None:
    handler = make_handler(max_connections=1)
    baseline = fd_count()
    not_a_database = tmp_path / "garbage.db"
    not_a_database.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(ResourceError) as info:
        handler.create_checkpoint(_database(not_a_database), "p1", "a")
    assert info.value.operation == "open"
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert fd_count() == baseline
    _nothing_lent(handler)


def test_a_lock_held_by_another_program_is_busy(
    handler: DatabaseResourceHandler, db_path: Path, rows: Any
) -> None:
    resource = _database(db_path, busy_timeout="100ms")
    with handler.connection(resource, "warm-up"):
        pass  # the file is in WAL mode now
    handler.release_plan("warm-up")
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(ResourceBusyError) as info:
            handler.create_checkpoint(resource, "p1", "a")
        error = info.value
        assert error.holder is None
        assert _context(error) == ("p1", "a", "db", "create_checkpoint")
        assert isinstance(error.__cause__, sqlite3.OperationalError)
        assert "database is locked" in str(error.__cause__)
        _nothing_lent(handler)
        stats = handler.stats()
        assert stats.busy_timeouts == 1
    finally:
        other.rollback()
        other.close()
    # The plan's write turn was given back with its connection.
    quick = _database(db_path, busy_timeout="100ms")
    _insert(handler, quick, "p2", "after")
    handler.release_plan("p2")
    assert rows(db_path, "SELECT v FROM t") == [("after",)]


def test_a_locked_error_from_sql_is_busy_but_other_sql_errors_stay_the_drivers(
    handler: DatabaseResourceHandler, resource: Resource, faults: _Faults
) -> None:
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        handler.execute(resource, "p1", "SELECT * FROM missing")
    faults.fail("execute", sqlite3.OperationalError("database is locked"))
    with pytest.raises(ResourceBusyError) as info:
        handler.execute(resource, "p1", "SELECT 1")
    assert _context(info.value) == ("p1", None, "db", "execute")
    faults.restore()
    assert handler.execute(resource, "p1", "SELECT count(*) FROM t") == [(0,)]
    handler.rollback_plan("p1")


def test_close_failures_are_counted(
    make_handler: MakeHandler,
    resource: Resource,
    db_path: Path,
    faults: _Faults,
    caplog: pytest.LogCaptureFixture,
    file_fds: Callable[..., int],
) -> None:
    handler = make_handler(max_connections=2, idle_timeout="100ms")
    faults.fail("close", sqlite3.ProgrammingError("close failed"), after_real_call=True)
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
    assert file_fds(db_path) == 0


def test_a_label_used_twice_leaves_the_plan_as_it_was(
    handler: DatabaseResourceHandler, resource: Resource
) -> None:
    handler.create_checkpoint(resource, "p1", "a")
    with pytest.raises(CheckpointError) as info:
        handler.create_checkpoint(resource, "p1", "a")
    assert _context(info.value) == ("p1", "a", "db", "create_checkpoint")
    assert handler.stats().checkpoints == 1
    handler.rollback_plan("p1")
    _nothing_lent(handler)


@pytest.mark.parametrize(
    ("plan_id", "checkpoint_id"),
    [("", "a"), ("p", ""), ("p\x00", "a"), ("p", "x" * 257), (None, "a"), ("p", 5)],
)
def test_bad_labels_are_refused_before_anything_happens(
    handler: DatabaseResourceHandler, resource: Resource, plan_id: Any, checkpoint_id: Any
) -> None:
    with pytest.raises(ValueError):
        handler.create_checkpoint(resource, plan_id, checkpoint_id)
    assert handler.stats().open_connections == 0
    _nothing_lent(handler)


def test_bad_resource_settings_are_a_resource_error(handler: DatabaseResourceHandler) -> None:
    with pytest.raises(ResourceError, match=r"bad setting .*journal_mode") as info:
        handler.create_checkpoint(
            Resource("db", "database", engine="sqlite", location="x.db", journal_mode="nope"),
            "p1",
            "a",
        )
    assert (info.value.plan_id, info.value.resource) == ("p1", "db")
    with pytest.raises(TypeError):
        handler.create_checkpoint("db", "p1", "a")  # type: ignore[arg-type]
    _nothing_lent(handler)
    assert handler.stats().open_connections == 0


def test_a_non_driver_error_while_committing_still_rolls_back(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, faults: _Faults, rows: Any
) -> None:
    _insert(handler, resource, "p1", "never committed")
    faults.fail("commit", RuntimeError("the driver broke"))
    with pytest.raises(RuntimeError, match="the driver broke"):
        handler.release_plan("p1")
    faults.restore()
    assert rows(db_path, "SELECT v FROM t") == []
    _nothing_lent(handler)


def test_a_memory_database_whose_rollback_fails_starts_empty(
    handler: DatabaseResourceHandler, faults: _Faults
) -> None:
    memory = _database(Path(":memory:"), "scratch")
    handler.execute(memory, "setup", "CREATE TABLE m (v TEXT)")
    handler.release_plan("setup")
    handler.execute(memory, "p1", "INSERT INTO m VALUES ('x')")
    faults.fail("rollback")
    with pytest.raises(ResourceError) as info:
        handler.rollback_plan("p1")
    assert info.value.operation == "rollback"
    faults.restore()
    # Its one connection was in an unknown state and was closed: the data went with it.
    assert handler.stats().open_connections == 0
    assert handler.execute(memory, "p2", "SELECT count(*) FROM sqlite_master") == [(0,)]
    handler.release_plan("p2")
