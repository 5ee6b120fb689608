"""Once SQLite ends a plan's transaction from inside a statement, nothing of the plan runs.

``INSERT OR ROLLBACK``, ``UPDATE OR ROLLBACK``, a table declared ``ON CONFLICT
ROLLBACK``, a trigger's ``RAISE(ROLLBACK, ...)`` and an interrupted write roll
the whole transaction back and leave the connection in autocommit mode (issue
10, item 1). A tool that catches the error and goes on must not commit its
later statements one by one, whichever way it runs them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cleveragents.errors import ResourceError
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

Rows = Callable[..., list[tuple[Any, ...]]]

SCHEMA = [
    "INSERT INTO t VALUES ('seed')",  # rowid 1, committed before any plan
    "CREATE TABLE u (k INTEGER PRIMARY KEY)",
    "INSERT INTO u VALUES (1), (2), (3)",
    "CREATE TABLE r (k INTEGER PRIMARY KEY ON CONFLICT ROLLBACK)",
    "INSERT INTO r VALUES (1)",
    "CREATE TABLE guarded (k INTEGER)",
    "CREATE TRIGGER no_inserts BEFORE INSERT ON guarded "
    "BEGIN SELECT RAISE(ROLLBACK, 'refused by trigger'); END",
]


@pytest.fixture(autouse=True)
def schema(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        for sql in SCHEMA:
            conn.execute(sql)
    finally:
        conn.close()


def _interrupt_a_write(handler: DatabaseResourceHandler, conn: sqlite3.Connection) -> None:
    # The interrupt lands while the INSERT runs, from inside it: deterministic.
    conn.create_function("interrupt_here", 1, lambda v: handler.interrupt() or v)
    conn.execute("INSERT INTO t SELECT interrupt_here(v) FROM t")


# Each ends the plan's transaction from inside the statement, and fails.
ENDINGS: dict[str, Callable[[DatabaseResourceHandler, sqlite3.Connection], object]] = {
    "insert or rollback": lambda h, conn: conn.execute("INSERT OR ROLLBACK INTO u VALUES (1)"),
    "update or rollback": lambda h, conn: conn.execute(
        "UPDATE OR ROLLBACK u SET k = 2 WHERE k = 3"
    ),
    "on conflict rollback": lambda h, conn: conn.execute("INSERT INTO r VALUES (1)"),
    "raise(rollback)": lambda h, conn: conn.execute("INSERT INTO guarded VALUES (1)"),
    "interrupted write": _interrupt_a_write,
}

# Ways a tool runs a write on the connection it was lent; *before* is a cursor
# it made, and used, before the transaction ended.
ROUTES: dict[str, Callable[[sqlite3.Connection, sqlite3.Cursor], object]] = {
    "execute": lambda conn, before: conn.execute("INSERT INTO t VALUES ('after')"),
    "execute, statement cached before": lambda conn, before: conn.execute(
        "INSERT INTO t VALUES (?)", ("after",)
    ),
    "executemany": lambda conn, before: conn.executemany(
        "INSERT INTO t VALUES (?)", [("after",), ("later",)]
    ),
    "a new cursor": lambda conn, before: conn.cursor().execute("INSERT INTO t VALUES ('after')"),
    "the cursor used before": lambda conn, before: before.execute(
        "INSERT INTO t VALUES (?)", ("after",)
    ),
    "executemany on a cursor": lambda conn, before: before.executemany(
        "INSERT INTO t VALUES (?)", [("after",)]
    ),
    "executescript": lambda conn, before: conn.executescript("INSERT INTO t VALUES ('after');"),
    "blob write": lambda conn, before: conn.blobopen("t", "v", 1).write(b"AFTR"),
    "a savepoint": lambda conn, before: conn.execute("SAVEPOINT mine"),
}


def _begin_then_lose(
    handler: DatabaseResourceHandler, conn: sqlite3.Connection, ending: str = "insert or rollback"
) -> sqlite3.Cursor:
    before = conn.cursor()
    before.execute("INSERT INTO t VALUES (?)", ("before",))
    with pytest.raises(sqlite3.DatabaseError):
        ENDINGS[ending](handler, conn)
    assert not conn.in_transaction  # SQLite ended it: the premise of every test here
    return before


@pytest.mark.parametrize("route", ROUTES)
def test_no_later_statement_of_the_block_autocommits(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows, route: str
) -> None:
    with handler.connection(resource, "p") as conn:
        before = _begin_then_lose(handler, conn)
        with pytest.raises(ResourceError):
            ROUTES[route](conn, before)
        assert not conn.in_transaction  # nor did anything begin a transaction of its own
    with pytest.raises(ResourceError, match="nothing was committed"):
        handler.release_plan("p")
    assert rows(db_path, "SELECT v FROM t") == [("seed",)]


@pytest.mark.parametrize("ending", ENDINGS)
def test_every_way_sqlite_ends_the_transaction_stops_the_plan_there(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows, ending: str
) -> None:
    with handler.connection(resource, "p") as conn:
        _begin_then_lose(handler, conn, ending)
        with pytest.raises(ResourceError, match=r"SQLite rolled back the plan's transaction"):
            conn.execute("INSERT INTO t VALUES ('after')")
    with pytest.raises(ResourceError, match="can no longer commit: SQLite rolled back"):
        handler.execute(resource, "p", "INSERT INTO t VALUES ('later')")
    with pytest.raises(ResourceError, match="nothing was committed"):
        handler.release_plan("p")
    assert rows(db_path, "SELECT v FROM t") == [("seed",)]
    assert rows(db_path, "SELECT k FROM u") == [(1,), (2,), (3,)]


def test_a_statement_cached_before_the_loss_is_checked_again_afterwards(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows
) -> None:
    """The driver's methods called unbound skip the lent connection's checks, not SQLite's.

    sqlite3 shows a cached statement to the authorizer only when it prepares
    it; once the handler knows the transaction is gone, every cached statement
    is prepared again, through the authorizer, which refuses it.
    """
    with handler.connection(resource, "p") as conn:
        _begin_then_lose(handler, conn)
    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
        sqlite3.Cursor(conn).execute("INSERT INTO t VALUES (?)", ("kept",))
    handler.rollback_plan("p")
    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
        sqlite3.Connection.execute(conn, "INSERT INTO t VALUES (?)", ("idle",))
    assert rows(db_path, "SELECT v FROM t") == [("seed",)]


def test_a_checkpoint_after_the_loss_does_not_begin_a_new_transaction(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows
) -> None:
    """SAVEPOINT outside a transaction begins one, which the release would then commit.

    Here the transaction ends outside any ``connection()`` block (a tool kept
    the connection and used it later), so the handler has not been told yet.
    """
    handler.create_checkpoint(resource, "p", "start")
    with handler.connection(resource, "p") as kept:
        kept.execute("INSERT INTO t VALUES ('before')")
    with pytest.raises(sqlite3.IntegrityError):
        kept.execute("INSERT OR ROLLBACK INTO u VALUES (1)")
    with pytest.raises(ResourceError, match=r"create_checkpoint failed .*SQLite rolled back"):
        handler.create_checkpoint(resource, "p", "after")
    with pytest.raises(ResourceError, match=r"rollback_to failed .*SQLite rolled back"):
        handler.rollback_to(resource, "p", "start")
    with pytest.raises(ResourceError, match="SQLite rolled back"):
        handler.execute(resource, "p", "INSERT INTO t VALUES ('after')")
    with pytest.raises(ResourceError, match="nothing was committed"):
        handler.release_plan("p")
    assert rows(db_path, "SELECT v FROM t") == [("seed",)]
