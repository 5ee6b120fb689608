"""SQLite-only faults: a file that is not a database, another program's lock, memory databases.

The faults every engine shares are in tests/handler/test_faults.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_faults import EngineFaults, error_context, nothing_lent

from cleveragents.errors import (
    ResourceBusyError,
    ResourceError,
)
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

MakeHandler = Callable[..., DatabaseResourceHandler]


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[EngineFaults]:
    made = EngineFaults("sqlite", monkeypatch)
    yield made
    made.restore()


def _database(path: Path, name: str = "db", **options: Any) -> Resource:
    return Resource(name=name, kind="database", engine="sqlite", location=str(path), **options)


def _insert(handler: DatabaseResourceHandler, resource: Resource, plan_id: str, value: str) -> None:
    with handler.connection(resource, plan_id) as conn:
        conn.execute("INSERT INTO t VALUES (?)", (value,))


# -- open, begin, close ------------------------------------------------------------------------


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
    nothing_lent(handler)


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
        assert error_context(error) == ("p1", "a", "db", "create_checkpoint")
        assert isinstance(error.__cause__, sqlite3.OperationalError)
        assert "database is locked" in str(error.__cause__)
        nothing_lent(handler)
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
    nothing_lent(handler)
    assert handler.stats().open_connections == 0


def test_a_memory_database_whose_rollback_fails_starts_empty(
    handler: DatabaseResourceHandler, faults: EngineFaults
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
