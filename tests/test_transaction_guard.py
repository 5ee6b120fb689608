"""A plan's SQL cannot take over the transaction, files or settings the handler owns (SQLite)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cleveragents.errors import ResourceError
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.resource.handlers.sqlite import SQLiteEngine, SQLiteSettings

Rows = Callable[..., list[tuple[Any, ...]]]


@pytest.mark.parametrize(
    ("sql", "refused"),
    [
        ("COMMIT", "BEGIN, COMMIT, END or ROLLBACK"),
        ("end transaction", "BEGIN, COMMIT, END or ROLLBACK"),
        ("ROLLBACK", "BEGIN, COMMIT, END or ROLLBACK"),
        ("BEGIN", "BEGIN, COMMIT, END or ROLLBACK"),
        ('RELEASE "cp_1"', "SAVEPOINT, RELEASE or ROLLBACK TO"),
        ("ROLLBACK TO cp_1", "SAVEPOINT, RELEASE or ROLLBACK TO"),
        ("SAVEPOINT mine", "SAVEPOINT, RELEASE or ROLLBACK TO"),
        ("ATTACH DATABASE 'elsewhere.db' AS e", "ATTACH"),
        ("PRAGMA synchronous = off", "PRAGMA synchronous = ..."),
        ("PRAGMA query_only = 1", "PRAGMA query_only = ..."),
    ],
)
def test_plan_sql_that_would_take_over_is_refused_and_the_plan_stays_whole(
    handler: DatabaseResourceHandler,
    resource: Resource,
    db_path: Path,
    rows: Rows,
    sql: str,
    refused: str,
) -> None:
    handler.create_checkpoint(resource, "p", "start")
    handler.execute(resource, "p", "INSERT INTO t VALUES ('kept until the plan ends')")

    with pytest.raises(ResourceError, match=f"plans may not run {refused}"):
        handler.execute(resource, "p", sql)

    # Nothing was committed behind the plan's back, no file was made, and the
    # plan's transaction and checkpoint are intact.
    assert rows(db_path, "SELECT count(*) FROM t") == [(0,)]
    assert not (db_path.parent / "elsewhere.db").exists()
    handler.rollback_to(resource, "p", "start")
    handler.execute(resource, "p", "INSERT INTO t VALUES ('after')")
    handler.release_plan("p")
    assert rows(db_path, "SELECT v FROM t") == [("after",)]


def test_reading_settings_and_the_schema_is_allowed(
    handler: DatabaseResourceHandler, resource: Resource
) -> None:
    assert handler.execute(resource, "p", "PRAGMA foreign_keys") == [(1,)]
    assert [row[1] for row in handler.execute(resource, "p", "PRAGMA table_info(t)")] == ["v"]
    handler.release_plan("p")


def test_the_lent_connection_refuses_to_end_the_plan(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows
) -> None:
    with handler.connection(resource, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('x')")
        with pytest.raises(ResourceError, match=r"cannot commit\(\)"):
            conn.commit()
        with pytest.raises(ResourceError, match=r"cannot rollback\(\)"):
            conn.rollback()
        with pytest.raises(ResourceError, match="not a context manager"), conn:
            pass
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            conn.execute("COMMIT")
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            conn.cursor().execute("ROLLBACK")
        assert conn.in_transaction
    assert rows(db_path, "SELECT count(*) FROM t") == [(0,)]
    handler.rollback_plan("p")
    assert rows(db_path, "SELECT count(*) FROM t") == [(0,)]


def test_a_refusal_does_not_colour_the_next_error(
    handler: DatabaseResourceHandler, resource: Resource
) -> None:
    with handler.connection(resource, "p") as conn, pytest.raises(sqlite3.DatabaseError):
        conn.execute("COMMIT")  # refused on the lent connection, not through execute()
    with pytest.raises(sqlite3.OperationalError, match="no such table: missing"):
        handler.execute(resource, "p", "SELECT * FROM missing")
    handler.rollback_plan("p")


def test_a_statement_the_handler_ran_cannot_be_borrowed_from_the_cache(
    make_handler: Callable[..., DatabaseResourceHandler],
    resource: Resource,
    db_path: Path,
    rows: Rows,
) -> None:
    # One pooled connection: the second plan reuses the first one's, whose
    # statement cache already holds the handler's own COMMIT.
    handler = make_handler(max_connections=1)
    handler.execute(resource, "first", "INSERT INTO t VALUES ('first')")
    handler.release_plan("first")
    handler.execute(resource, "second", "INSERT INTO t VALUES ('second')")
    with pytest.raises(ResourceError, match="plans may not run BEGIN, COMMIT"):
        handler.execute(resource, "second", "COMMIT")
    handler.rollback_plan("second")
    assert rows(db_path, "SELECT v FROM t") == [("first",)]


def test_interrupting_a_connection_closed_meanwhile_is_quiet(tmp_path: Path) -> None:
    engine = SQLiteEngine()
    conn = engine.open(SQLiteSettings(location=str(tmp_path / "x.db")), application_name="t")
    engine.close(conn)
    engine.interrupt(conn)  # its plan ended between the snapshot and the interrupt
