"""A plan whose transaction ended under it commits nothing, anywhere (DESIGN.md section 4)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable

import pytest

from cleveragents.errors import PartialCommitError, ResourceBusyError, ResourceError
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

from .conftest import Database

# Statements that end the plan's transaction from inside themselves, by engine.
ENDS_THE_TRANSACTION = {
    "sqlite": [
        "INSERT OR ROLLBACK INTO u VALUES (1)",
        "UPDATE OR ROLLBACK u SET k = 2 WHERE k = 3",
        "INSERT INTO r VALUES (1)",  # the table says ON CONFLICT ROLLBACK
        "INSERT INTO guarded VALUES (1)",  # a trigger says RAISE(ROLLBACK, ...)
    ],
}
SCHEMA = {
    "sqlite": [
        "CREATE TABLE u (k INTEGER PRIMARY KEY)",
        "INSERT INTO u VALUES (1), (2), (3)",
        "CREATE TABLE r (k INTEGER PRIMARY KEY ON CONFLICT ROLLBACK)",
        "INSERT INTO r VALUES (1)",
        "CREATE TABLE guarded (k INTEGER)",
        "CREATE TRIGGER no_inserts BEFORE INSERT ON guarded "
        "BEGIN SELECT RAISE(ROLLBACK, 'refused by trigger'); END",
    ],
}


def _ending_statements(engine: str) -> list[str]:
    statements = ENDS_THE_TRANSACTION.get(engine)
    if not statements:
        pytest.skip(f"no statement ends the transaction from inside on {engine}")
    return statements


@pytest.mark.parametrize("which", range(4))
def test_a_statement_that_ends_the_transaction_poisons_the_plan(
    handler: DatabaseResourceHandler, db: Database, engine: str, which: int
) -> None:
    statements = _ending_statements(engine)
    for sql in SCHEMA[engine]:
        db.run(sql)
    res = db.resource()
    handler.execute(res, "p", "INSERT INTO t VALUES ('before')")
    with pytest.raises(sqlite3.DatabaseError):
        handler.execute(res, "p", statements[which])

    # No later statement of the plan runs outside its transaction...
    with pytest.raises(ResourceError, match="can no longer commit"):
        handler.execute(res, "p", "INSERT INTO t VALUES ('after')")
    with pytest.raises(ResourceError, match="can no longer commit"):
        handler.create_checkpoint(res, "p", "later")
    # ...and its release commits nothing and says so.
    with pytest.raises(ResourceError, match="nothing was committed") as raised:
        handler.release_plan("p")
    assert not isinstance(raised.value, PartialCommitError)
    assert db.rows() == []
    assert handler.stats().active_plans == 0
    # The connection it used serves the next plan with a transaction of its own.
    handler.execute(res, "q", "INSERT INTO t VALUES ('next')")
    handler.release_plan("q")
    assert db.rows() == ["next"]


def test_a_connection_block_that_ends_the_transaction_poisons_the_plan(
    handler: DatabaseResourceHandler, db: Database, engine: str
) -> None:
    statements = _ending_statements(engine)
    for sql in SCHEMA[engine]:
        db.run(sql)
    res = db.resource()
    handler.create_checkpoint(res, "p", "start")
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('before')")
        with pytest.raises(sqlite3.DatabaseError):
            conn.execute(statements[0])
    with pytest.raises(ResourceError, match="can no longer commit"), handler.connection(res, "p"):
        pass
    with pytest.raises(ResourceError, match="nothing was committed"):
        handler.release_plan("p")
    assert db.rows() == []


def test_a_plan_that_cannot_commit_on_one_database_commits_on_none(
    handler: DatabaseResourceHandler,
    db: Database,
    make_db: Callable[[str], Database],
    engine: str,
    tmp_path: object,
) -> None:
    """The check runs on every database before the first COMMIT (issue 10, item 5)."""
    first = make_db("first")
    if engine == "sqlite":
        db.run("CREATE TABLE u (k INTEGER PRIMARY KEY)")
        db.run("INSERT INTO u VALUES (1)")
    res_first, res_db = first.resource("first"), db.resource("db")
    handler.execute(res_first, "p", "INSERT INTO t VALUES ('first')")
    handler.execute(res_db, "p", "INSERT INTO t VALUES ('second')")
    if engine == "postgresql":
        # A failed statement aborts PostgreSQL's transaction until rolled back.
        with pytest.raises(Exception, match="nope"):
            handler.execute(res_db, "p", "SELECT * FROM nope")
    else:
        with pytest.raises(sqlite3.IntegrityError):
            handler.execute(res_db, "p", "INSERT OR ROLLBACK INTO u VALUES (1)")
    with pytest.raises(ResourceError, match="nothing was committed") as raised:
        handler.release_plan("p")
    assert not isinstance(raised.value, PartialCommitError)
    assert first.rows() == []
    assert db.rows() == []


def test_a_lock_wait_inside_a_connection_block_is_busy(
    handler: DatabaseResourceHandler, db: Database, engine: str
) -> None:
    """Driver errors meaning busy reach the caller as ResourceBusyError, chained."""
    db.run("INSERT INTO t VALUES ('held')")
    res: Resource = db.resource(
        busy_timeout="200ms", **({"lock": "deferred"} if engine == "sqlite" else {})
    )
    assert handler.execute(res, "p", "SELECT count(*) FROM t") == [(1,)]
    blocker = db.connect()
    try:
        if engine == "sqlite":
            blocker.execute("BEGIN IMMEDIATE")
        else:
            blocker.execute("BEGIN")
            blocker.execute("UPDATE t SET v = 'mine'")
        with pytest.raises(ResourceBusyError) as raised, handler.connection(res, "p") as conn:
            conn.execute("UPDATE t SET v = 'theirs'")
        assert raised.value.__cause__ is not None
        assert raised.value.plan_id == "p"
        assert raised.value.operation == "connection"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    handler.rollback_plan("p")
    assert db.rows() == ["held"]


# A write that never ends on its own: only an interrupt stops it.
ENDLESS_WRITE = {
    "sqlite": "UPDATE t SET v = (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
    "SELECT x + 1 FROM c) SELECT count(*) FROM c)",
    "postgresql": "UPDATE t SET v = (SELECT 'slept' FROM pg_sleep(600))",
}


def test_an_interrupted_write_commits_nothing(
    handler: DatabaseResourceHandler, db: Database, engine: str
) -> None:
    """interrupt() of a write: SQLite ends the transaction, PostgreSQL aborts it.

    Either way the plan's release commits nothing and says so; on SQLite the
    plan is poisoned at once (its next call raises), as nothing of its
    transaction is left to go on with.
    """
    res = db.resource()
    handler.execute(res, "p", "INSERT INTO t VALUES ('before')")
    errors: list[BaseException] = []

    def endless_write() -> None:
        try:
            handler.execute(res, "p", ENDLESS_WRITE[engine])
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=endless_write)
    writer.start()
    while writer.is_alive():  # an interrupt before the statement starts is lost
        handler.interrupt()
        writer.join(0.05)
    (error,) = errors
    if engine == "sqlite":
        assert isinstance(error, sqlite3.OperationalError) and str(error) == "interrupted"
    else:
        assert type(error).__name__ == "QueryCanceled", repr(error)
    if engine == "sqlite":
        with pytest.raises(ResourceError, match="can no longer commit"):
            handler.execute(res, "p", "INSERT INTO t VALUES ('after')")
    with pytest.raises(ResourceError, match="nothing was committed") as raised:
        handler.release_plan("p")
    assert not isinstance(raised.value, PartialCommitError)
    assert db.rows() == []
    stats = handler.stats()
    assert (stats.active_plans, stats.open_connections) == (0, stats.idle_connections)
    handler.execute(res, "q", "INSERT INTO t VALUES ('next')")
    handler.release_plan("q")
    assert db.rows() == ["next"]
