"""What a plan leaves on a pooled SQLite connection never reaches the plan after it.

Settings and per-connection Python state (issue 10, item 3), cursors and read
snapshots (item 4), TEMP objects (issue 14, item 1) and a tool's own
authorizer (issue 14, item 2). Most tests use a handler with one connection,
so the second plan surely gets the first one's, put back or replaced.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import make_table

from cleveragents.errors import ResourceBusyError, ResourceError
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.resource.handlers.sqlite import PlanCursor

Rows = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
def pooled(make_handler: Callable[..., DatabaseResourceHandler]) -> DatabaseResourceHandler:
    """Return a handler with a single connection: every plan gets the one before's."""
    return make_handler(max_connections=1, acquire_timeout=2.0)


def _write(path: Path, sql: str) -> None:
    """Commit *sql* through a connection of another program."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(sql)
    finally:
        conn.close()


# -- settings (issue 10, item 3) ----------------------------------------------------------


def test_a_plan_cannot_switch_check_constraints_off_for_the_plans_after_it(
    pooled: DatabaseResourceHandler, tmp_path: Path, rows: Rows
) -> None:
    path = tmp_path / "stock.db"
    make_table(path, "CREATE TABLE stock (qty INT CHECK (qty >= 0))")
    res = Resource("stock", "database", location=str(path))
    with pytest.raises(ResourceError, match="plans may not run PRAGMA ignore_check_constraints"):
        pooled.execute(res, "first", "PRAGMA ignore_check_constraints = 1")
    with pooled.connection(res, "first") as conn, pytest.raises(sqlite3.DatabaseError):
        conn.execute("PRAGMA ignore_check_constraints = ON")  # a tool's way, refused too
    pooled.release_plan("first")

    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        pooled.execute(res, "second", "INSERT INTO stock VALUES (-5)")
    pooled.release_plan("second")
    assert rows(path, "SELECT qty FROM stock") == []


@pytest.mark.parametrize(
    "setting",
    [
        "ignore_check_constraints = 1",
        "case_sensitive_like = 1",
        "max_page_count = 10",
        "wal_autocheckpoint = 0",
        "automatic_index = 0",
        "reverse_unordered_selects = 1",
        "cache_spill = 0",
        "legacy_alter_table = 1",
        "cell_size_check = 1",
        "analysis_limit = 5",
        "secure_delete = 1",
        "journal_size_limit = 0",
        "threads = 4",
        "soft_heap_limit = 1000000",
        "temp_store = memory",
        "main.cache_size = -4000",
        "optimize(0xfffe)",
    ],
)
def test_pragmas_that_would_outlive_the_plan_are_refused(
    handler: DatabaseResourceHandler, resource: Resource, setting: str
) -> None:
    name = setting.split("=", maxsplit=1)[0].split("(", maxsplit=1)[0].strip().split(".")[-1]
    with pytest.raises(ResourceError, match=rf"plans may not run PRAGMA {name} = \.\.\."):
        handler.execute(resource, "p", f"PRAGMA {setting}")
    handler.rollback_plan("p")


def test_pragmas_that_end_with_the_plan_or_only_read_are_allowed(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows
) -> None:
    handler.execute(resource, "p", "PRAGMA defer_foreign_keys = 1")
    assert handler.execute(resource, "p", "PRAGMA defer_foreign_keys") == [(1,)]
    handler.execute(resource, "p", "PRAGMA main.user_version = 7")
    assert [row[1] for row in handler.execute(resource, "p", "PRAGMA table_info(t)")] == ["v"]
    assert handler.execute(resource, "p", "PRAGMA main.quick_check(1)") == [("ok",)]
    assert handler.execute(resource, "p", "PRAGMA foreign_key_check(t)") == []
    assert handler.execute(resource, "p", "PRAGMA case_sensitive_like") == []  # no argument
    handler.release_plan("p")
    assert rows(db_path, "PRAGMA user_version") == [(7,)]  # committed with the plan
    assert handler.execute(resource, "q", "PRAGMA defer_foreign_keys") == [(0,)]
    handler.release_plan("q")


def test_factories_a_tool_set_do_not_reach_the_next_plan(
    pooled: DatabaseResourceHandler, resource: Resource
) -> None:
    pooled.execute(resource, "seed", "INSERT INTO t VALUES ('x')")
    pooled.release_plan("seed")
    with pooled.connection(resource, "first") as conn:
        conn.row_factory = sqlite3.Row
        conn.text_factory = bytes
        assert conn.execute("SELECT v FROM t").fetchone()["v"] == b"x"
        first = conn
    pooled.release_plan("first")

    with pooled.connection(resource, "second") as conn:
        assert conn is first  # the same connection, put back
        assert (conn.row_factory, conn.text_factory) == (None, str)
        rows = conn.execute("SELECT v FROM t").fetchall()
        assert rows == [("x",)]
        assert type(rows[0]) is tuple
    assert pooled.execute(resource, "second", "SELECT v FROM t") == [("x",)]
    pooled.release_plan("second")


class _NinetyNine:
    def step(self, value: object) -> None:
        pass

    def value(self) -> int:
        return 99

    def inverse(self, value: object) -> None:
        pass

    def finalize(self) -> int:
        return 99


# A tool's SQL function or collation, and a query whose answer it would change.
DEFINITIONS: dict[str, tuple[Callable[[sqlite3.Connection], None], str, list[tuple[Any, ...]]]] = {
    "function": (
        lambda conn: conn.create_function("lower", 1, lambda s: "hacked"),
        "SELECT lower('ABC')",
        [("abc",)],
    ),
    "aggregate": (
        lambda conn: conn.create_aggregate("count", 1, _NinetyNine),
        "SELECT count(v) FROM t",
        [(0,)],
    ),
    "window function": (
        lambda conn: conn.create_window_function("total", 1, _NinetyNine),
        "SELECT total(x) OVER () FROM (SELECT 1 AS x)",
        [(1.0,)],
    ),
    "collation": (
        lambda conn: conn.create_collation("NOCASE", lambda a, b: 0),
        "SELECT 'a' = 'B' COLLATE NOCASE",
        [(0,)],
    ),
}


@pytest.mark.parametrize("definition", DEFINITIONS)
def test_sql_functions_a_tool_defined_do_not_reach_the_next_plan(
    pooled: DatabaseResourceHandler, resource: Resource, definition: str
) -> None:
    define, query, honest = DEFINITIONS[definition]
    with pooled.connection(resource, "first") as conn:
        define(conn)
        define(conn)  # twice is as once
        assert conn.execute(query).fetchall() != honest  # the tool's own plan uses it
        first = conn
    pooled.release_plan("first")

    with pooled.connection(resource, "second") as conn:
        assert conn is not first  # it cannot be taken off again: the connection was replaced
        assert conn.execute(query).fetchall() == honest
    pooled.release_plan("second")
    assert pooled.stats().open_connections == 1


def _deny_inserts(action: int, *rest: object) -> int:
    return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_INSERT else sqlite3.SQLITE_OK


# What a tool may set on its connection: each would watch, or refuse, the next plan's INSERT.
SETTINGS: dict[str, Callable[[sqlite3.Connection], object]] = {
    "progress handler": lambda conn: conn.set_progress_handler(lambda: _watch("progress"), 1),
    "trace callback": lambda conn: conn.set_trace_callback(_watch),
    "limit": lambda conn: (
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 20),
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10),
    ),
    "authorizer": lambda conn: conn.set_authorizer(_deny_inserts),
    "isolation level": lambda conn: setattr(conn, "isolation_level", "DEFERRED"),
}
TRACED: list[str] = []


def _watch(what: str) -> None:
    TRACED.append(what)


@pytest.mark.parametrize("setting", SETTINGS)
def test_what_a_tool_sets_on_its_connection_is_put_back(
    pooled: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows, setting: str
) -> None:
    with pooled.connection(resource, "first") as conn:
        SETTINGS[setting](conn)
        first = conn
    pooled.rollback_plan("first")  # the handler's ROLLBACK runs whatever the tool set
    TRACED.clear()

    with pooled.connection(resource, "second") as conn:
        assert conn is first  # the same connection, put back
        assert conn.isolation_level is None
        conn.execute("INSERT INTO t VALUES (?)", ("longer than the tool's limit of ten",))
    pooled.release_plan("second")
    assert rows(db_path, "SELECT v FROM t") == [("longer than the tool's limit of ten",)]
    assert TRACED == []  # the next plan's statements are nobody's to watch


# -- a tool's own authorizer (issue 14, item 2) ---------------------------------------------


def test_a_tools_sandbox_authorizer_cannot_take_the_handlers_guard_away(
    pooled: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows
) -> None:
    with pooled.connection(resource, "first") as conn:
        conn.execute("INSERT INTO t VALUES ('first')")
        conn.set_authorizer(
            lambda action, *rest: (
                sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_DELETE else sqlite3.SQLITE_OK
            )
        )
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            conn.execute("DELETE FROM t")  # the tool's sandbox works...
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            conn.execute("COMMIT")  # ...and so does the handler's guard
        conn.set_authorizer(None)
        assert conn.execute("DELETE FROM t WHERE v = 'none'").rowcount == 0  # sandbox gone
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            conn.execute("COMMIT")  # the guard stays
    pooled.release_plan("first")

    pooled.execute(resource, "second", "INSERT INTO t VALUES ('second')")
    with pytest.raises(ResourceError, match="plans may not run BEGIN, COMMIT"):
        pooled.execute(resource, "second", "COMMIT")
    pooled.rollback_plan("second")
    assert rows(db_path, "SELECT v FROM t") == [("first",)]


@pytest.mark.parametrize("replacement", [None, lambda *args: sqlite3.SQLITE_OK])
def test_an_authorizer_changed_through_the_driver_poisons_the_plan_and_the_connection_goes(
    pooled: DatabaseResourceHandler,
    resource: Resource,
    db_path: Path,
    rows: Rows,
    replacement: Any,
) -> None:
    with pooled.connection(resource, "first") as conn:
        conn.execute("INSERT INTO t VALUES ('first')")
        sqlite3.Connection.set_authorizer(conn, replacement)  # past the lent object's method
        first = conn
    with pytest.raises(ResourceError, match="can no longer commit: the handler's authorizer"):
        pooled.execute(resource, "first", "INSERT INTO t VALUES ('more')")
    with pytest.raises(ResourceError, match="nothing was committed"):
        pooled.release_plan("first")

    with pooled.connection(resource, "second") as conn:
        assert conn is not first
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            conn.execute("COMMIT")
    pooled.rollback_plan("second")
    assert rows(db_path, "SELECT v FROM t") == []
    assert pooled.stats().open_connections == 1


# -- cursors, blobs and read snapshots (issue 10, item 4) -----------------------------------


def test_a_cursor_kept_past_its_plan_does_not_hold_the_pooled_connection(
    pooled: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows
) -> None:
    _write(db_path, "INSERT INTO t VALUES ('a'), ('b'), ('c')")
    with pooled.connection(resource, "first") as conn:
        kept = conn.execute("SELECT v FROM t ORDER BY v")
        assert kept.fetchone() == ("a",)  # rows left: SQLite keeps reading a snapshot
        blob = conn.blobopen("t", "v", 1, readonly=True)
    pooled.release_plan("first")
    _write(db_path, "INSERT INTO t VALUES ('other program')")  # the snapshot is old now

    pooled.execute(resource, "second", "INSERT INTO t VALUES ('second')")
    pooled.release_plan("second")
    assert ("second",) in rows(db_path, "SELECT v FROM t")
    with pytest.raises(sqlite3.ProgrammingError, match="closed cursor"):
        kept.fetchone()
    with pytest.raises(sqlite3.ProgrammingError, match="closed blob"):
        blob.read()


def test_every_open_cursor_of_a_plan_is_closed_however_many(
    pooled: DatabaseResourceHandler, resource: Resource
) -> None:
    _write(resource.options["location"], "INSERT INTO t VALUES ('a'), ('b')")
    with pooled.connection(resource, "first") as conn:
        kept = [conn.execute("SELECT v FROM t") for _ in range(150)]
        for _ in range(100):
            conn.execute("SELECT v FROM t")  # dropped at once: forgotten as they go
    pooled.release_plan("first")
    for cursor in kept:
        with pytest.raises(sqlite3.ProgrammingError, match="closed cursor"):
            cursor.fetchone()
    assert pooled.execute(resource, "second", "SELECT count(*) FROM t") == [(2,)]
    pooled.release_plan("second")


def test_a_cursor_kept_past_its_plan_cannot_write_into_the_next_plan(
    pooled: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows
) -> None:
    with pooled.connection(resource, "first") as conn:
        kept = conn.cursor()
        kept.execute("INSERT INTO t VALUES ('first')")
    pooled.release_plan("first")
    with pytest.raises(ResourceError, match="belongs to a plan that has ended"):
        kept.execute("INSERT INTO t VALUES ('idle')")

    with pooled.connection(resource, "second") as conn:
        with pytest.raises(ResourceError, match="belongs to a plan that has ended"):
            kept.execute("INSERT INTO t VALUES ('smuggled')")
        with pytest.raises(ResourceError, match="belongs to a plan that has ended"):
            kept.executemany("INSERT INTO t VALUES (?)", [("smuggled",)])
        conn.execute("INSERT INTO t VALUES ('second')")
    pooled.release_plan("second")
    assert rows(db_path, "SELECT v FROM t ORDER BY v") == [("first",), ("second",)]


def test_a_connection_kept_past_its_plan_runs_nothing_while_idle(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows
) -> None:
    with handler.connection(resource, "first") as kept:
        kept.execute("INSERT INTO t VALUES ('first')")
    handler.release_plan("first")
    with pytest.raises(ResourceError, match="not lent to a plan any more"):
        kept.execute("INSERT INTO t VALUES ('idle')")
    with pytest.raises(ResourceError, match="belongs to a plan that has ended"):
        kept.cursor().execute("INSERT INTO t VALUES ('idle')")
    # The driver's own method skips the lent object's check, not the authorizer's.
    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
        sqlite3.Connection.execute(kept, "INSERT INTO t VALUES ('unbound')")
    assert rows(db_path, "SELECT v FROM t") == [("first",)]


def test_a_statement_left_open_behind_the_handlers_back_fails_one_plan_at_most(
    pooled: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows
) -> None:
    """A cursor made with the driver's class is not the lent connection's to close.

    Its old snapshot makes the next BEGIN IMMEDIATE on that connection fail at
    once; the connection is then replaced instead of being pooled again.
    """
    _write(db_path, "INSERT INTO t VALUES ('a'), ('b')")
    with pooled.connection(resource, "first") as conn:
        hidden = sqlite3.Cursor(conn).execute("SELECT v FROM t")
        assert hidden.fetchone() == ("a",)
    pooled.release_plan("first")
    _write(db_path, "INSERT INTO t VALUES ('other program')")

    with pytest.raises(ResourceBusyError):
        pooled.execute(resource, "second", "INSERT INTO t VALUES ('second')")
    pooled.execute(resource, "third", "INSERT INTO t VALUES ('third')")
    pooled.release_plan("third")
    assert ("third",) in rows(db_path, "SELECT v FROM t")


# -- TEMP objects (issue 14, item 1) -------------------------------------------------------

TEMP_OBJECTS = {
    "temp table": "CREATE TEMP TABLE t (v TEXT)",
    "table in the temp schema": "CREATE TABLE temp.t (v TEXT)",
    "temp trigger on a main table": (
        "CREATE TEMP TRIGGER swallow AFTER INSERT ON main.t BEGIN DELETE FROM t; END"
    ),
    "temp view": "CREATE TEMP VIEW t AS SELECT 'shadow' AS v",
}


@pytest.mark.parametrize("temp", TEMP_OBJECTS)
def test_temp_objects_of_a_plan_do_not_outlive_it(
    pooled: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows, temp: str
) -> None:
    # Twice: the second time sqlite3 serves the CREATE from its statement cache.
    for round_ in ("1", "2"):
        pooled.execute(resource, f"first-{round_}", TEMP_OBJECTS[temp])
        pooled.release_plan(f"first-{round_}")
        with pooled.connection(resource, f"second-{round_}") as conn:
            conn.execute("INSERT INTO t VALUES (?)", (round_,))
        pooled.release_plan(f"second-{round_}")
    assert rows(db_path, "SELECT v FROM t ORDER BY v") == [("1",), ("2",)]


def test_temp_objects_that_cannot_be_dropped_take_their_connection_with_them(
    pooled: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows
) -> None:
    """A statement still reading a TEMP table keeps SQLite from dropping it: replace."""
    with pooled.connection(resource, "first") as conn:
        conn.execute("CREATE TEMP TABLE t (v TEXT)")
        conn.execute("INSERT INTO temp.t VALUES ('a'), ('b')")
        reader = sqlite3.Cursor(conn).execute("SELECT v FROM temp.t")  # not the plan's to close
        assert reader.fetchone() == ("a",)
        first = conn
    pooled.release_plan("first")

    with pooled.connection(resource, "second") as conn:
        assert conn is not first
        conn.execute("INSERT INTO t VALUES ('second')")
    pooled.release_plan("second")
    assert rows(db_path, "SELECT v FROM t") == [("second",)]


# -- a ':memory:' database: one connection shared by its plans ---------------------------


def test_a_memory_database_is_put_back_after_every_plan(
    handler: DatabaseResourceHandler, caplog: pytest.LogCaptureFixture
) -> None:
    res = Resource("mem", "database", location=":memory:")
    handler.execute(res, "schema", "CREATE TABLE t (v TEXT)")
    handler.release_plan("schema")
    with handler.connection(res, "first") as conn:
        conn.execute("CREATE TEMP TABLE t (v TEXT)")
        conn.row_factory = sqlite3.Row
        with pytest.raises(ResourceError, match="':memory:' database cannot take create_function"):
            conn.create_function("lower", 1, lambda s: "hacked")
    handler.release_plan("first")
    handler.execute(res, "second", "INSERT INTO t VALUES ('kept')")
    handler.release_plan("second")

    with handler.connection(res, "third") as conn:
        assert conn.execute("SELECT v FROM main.t").fetchall() == [("kept",)]
        sqlite3.Connection.set_authorizer(conn, None)
    with caplog.at_level(logging.WARNING), pytest.raises(ResourceError, match="nothing was"):
        handler.release_plan("third")
    assert "left something behind on a ':memory:' database" in caplog.text
    handler.execute(res, "fourth", "INSERT INTO t VALUES ('fourth')")
    with pytest.raises(ResourceError, match="plans may not run BEGIN, COMMIT"):
        handler.execute(res, "fourth", "COMMIT")  # the guard is back
    handler.rollback_plan("fourth")
    assert handler.execute(res, "fifth", "SELECT v FROM t") == [("kept",)]
    handler.release_plan("fifth")


# -- what the lent connection refuses, and what it lends as usual ---------------------------


@pytest.mark.parametrize(
    ("call", "refused"),
    [
        (lambda conn: conn.close(), "cannot close"),
        (lambda conn: conn.deserialize(b""), "cannot deserialize"),
        (lambda conn: conn.backup(sqlite3.connect(":memory:")), "cannot backup"),
        (lambda conn: conn.executescript("SELECT 1;"), "cannot executescript"),
        (lambda conn: conn.cursor().executescript("SELECT 1;"), "cannot executescript"),
        (lambda conn: conn.enable_load_extension(True), "cannot load extensions"),
        (lambda conn: conn.load_extension("evil"), "cannot load extensions"),
    ],
)
def test_what_the_lent_connection_refuses_leaves_the_plan_whole(
    handler: DatabaseResourceHandler,
    resource: Resource,
    db_path: Path,
    rows: Rows,
    call: Callable[[sqlite3.Connection], object],
    refused: str,
) -> None:
    with handler.connection(resource, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('kept')")
        with pytest.raises(ResourceError, match=refused):
            call(conn)
        assert conn.in_transaction
    handler.release_plan("p")
    assert rows(db_path, "SELECT v FROM t") == [("kept",)]


def test_custom_cursors_and_iterdump_work_inside_the_plan(
    pooled: DatabaseResourceHandler, resource: Resource
) -> None:
    ran: list[str] = []

    class LoggingCursor(sqlite3.Cursor):
        def execute(self, sql: str, parameters: Any = (), /) -> LoggingCursor:
            ran.append(sql)
            return super().execute(sql, parameters)

    with pooled.connection(resource, "p") as conn:
        cursor = conn.cursor(LoggingCursor)
        assert isinstance(cursor, LoggingCursor)
        cursor.execute("INSERT INTO t VALUES ('logged')")
        assert isinstance(conn.cursor(PlanCursor), PlanCursor)
        with pytest.raises(TypeError, match=r"sqlite3\.Cursor subclasses"):
            conn.cursor(lambda c: sqlite3.Cursor(c))  # noqa: PLW0108 - not a class
        dump = list(conn.iterdump())
    pooled.release_plan("p")
    assert ran == ["INSERT INTO t VALUES ('logged')"]
    assert "INSERT INTO \"t\" VALUES('logged');" in dump
    with pytest.raises(ResourceError, match="belongs to a plan that has ended"):
        cursor.execute("INSERT INTO t VALUES ('later')")


def test_a_connection_closed_through_the_driver_poisons_the_plan(
    pooled: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Rows
) -> None:
    with pooled.connection(resource, "p") as conn:
        conn.execute("INSERT INTO t VALUES ('lost')")
        sqlite3.Connection.close(conn)
    with pytest.raises(
        ResourceError, match="nothing was committed: the plan's connection was closed"
    ):
        pooled.release_plan("p")
    pooled.execute(resource, "q", "INSERT INTO t VALUES ('next')")
    pooled.release_plan("q")
    assert rows(db_path, "SELECT v FROM t") == [("next",)]


@pytest.mark.parametrize(
    "fail",
    [
        lambda conn: conn.execute("SELECT abs(?)", (-(2**63),)),
        lambda conn: conn.cursor().execute("SELECT abs(?)", (-(2**63),)),
        lambda conn: conn.executemany("INSERT INTO t SELECT abs(?)", [(-(2**63),)]),
        lambda conn: conn.cursor().executemany("INSERT INTO t SELECT abs(?)", [(-(2**63),)]),
    ],
)
def test_an_error_a_tool_keeps_does_not_keep_the_database_open(
    make_handler: Callable[..., DatabaseResourceHandler],
    resource: Resource,
    db_path: Path,
    file_fds: Callable[[Path], int],
    fail: Callable[[sqlite3.Connection], object],
) -> None:
    """A statement that failed while running is not held by the error's traceback."""
    kept: list[BaseException] = []
    handler = make_handler()
    with handler.connection(resource, "p") as conn:
        with pytest.raises(sqlite3.OperationalError, match="integer overflow") as raised:
            fail(conn)
        kept.append(raised.value)
    handler.rollback_plan("p")
    handler.close()
    assert file_fds(db_path) == 0
