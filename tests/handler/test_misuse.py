"""A plan ended from inside its own connection() block: refused, or ended for good."""

from __future__ import annotations

import sqlite3

import pytest

from cleveragents.errors import ResourceError
from cleveragents.resource.handlers.database import DatabaseResourceHandler

from .conftest import Database


def test_release_plan_inside_the_plans_own_block_is_refused_and_does_nothing(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    res = db.resource()
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('before')")
        with pytest.raises(ResourceError, match="inside one of the plan's own") as raised:
            handler.release_plan("p")
        assert (raised.value.plan_id, raised.value.operation) == ("p", "release_plan")
        assert "nothing was done" in str(raised.value)
        conn.execute("INSERT INTO t VALUES ('after')")  # still the plan's transaction
        assert db.rows() == []
    assert db.rows() == []
    assert handler.stats().active_plans == 1
    handler.release_plan("p")  # once the block ended, it commits all of it
    assert db.rows() == ["after", "before"]


def test_rollback_plan_inside_the_plans_own_block_ends_that_connection(
    handler: DatabaseResourceHandler, db: Database, engine: str
) -> None:
    res = db.resource()
    with handler.connection(res, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('undone')")
        handler.rollback_plan("p")
        assert handler.stats().active_plans == 0
        assert db.rows() == []
        # The block's connection was closed, never pooled: it runs nothing more.
        closed = (
            sqlite3.ProgrammingError
            if engine == "sqlite"
            else pytest.importorskip("psycopg").OperationalError
        )
        with pytest.raises(closed, match="closed"):
            conn.execute("INSERT INTO t VALUES ('too late')")
    stats = handler.stats()
    assert (stats.open_connections, stats.idle_connections, stats.rollbacks) == (0, 0, 1)
    with handler.connection(res, "q") as other:  # another plan gets a connection of its own
        assert other is not conn
        other.execute("INSERT INTO t VALUES ('q')")
    handler.release_plan("q")
    assert db.rows() == ["q"]
