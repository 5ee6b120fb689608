"""What tests/test_model.py generates and compares the handler with.

* :class:`Sql` and :class:`Act`: one statement a plan runs through ``execute()``,
  or one thing a tool does with the connection lent by ``connection()``; each
  names its hostile *family* (``None`` for ordinary work).
* :data:`FAMILIES`: every hostile family, with the issue it comes from.
* the statement strategies, per engine;
* :class:`SQLiteReference` and :class:`PostgreSQLReference`: the same engine
  driven by hand on a separate copy of the database (plain connections,
  ``BEGIN`` / ``SAVEPOINT`` / ``ROLLBACK TO`` / ``COMMIT`` issued directly, a
  fresh connection per plan), and a way to read what is committed in either
  copy through a separate connection.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from hypothesis import strategies as st

#: Every hostile family the model can generate, with where it comes from. The
#: test enables the ones whose fix is on main (HOSTILE_FAMILIES in test_model.py).
FAMILIES: dict[str, str] = {
    # -- SQLite -------------------------------------------------------------
    "sqlite-transaction-control": "BEGIN/COMMIT/END/ROLLBACK/SAVEPOINT/RELEASE/ROLLBACK TO "
    "in plan SQL (DESIGN 4)",
    "sqlite-comments": "transaction control after or among comments (issue 14 item 3)",
    "sqlite-or-rollback": "INSERT/UPDATE OR ROLLBACK hitting a conflict (issue 10 item 1)",
    "sqlite-conflict-rollback-table": "a table declared ON CONFLICT ROLLBACK (issue 10 item 1)",
    "sqlite-raise-rollback": "a trigger's RAISE(ROLLBACK, ...) (issue 10 item 1)",
    "sqlite-pragmas": "per-connection PRAGMA settings (issue 10 item 3)",
    "sqlite-temp-objects": "CREATE TEMP TABLE/VIEW/TRIGGER shadowing real tables (issue 14 item 1)",
    "sqlite-connection-state": "row_factory, text_factory, create_function on the lent "
    "connection (issue 10 item 3)",
    "sqlite-set-authorizer": "a tool's own set_authorizer() (issue 14 item 2)",
    "sqlite-isolation-level": "isolation_level = None on the lent connection (it commits)",
    "sqlite-executescript": "executescript() on the lent connection (it commits first)",
    "sqlite-kept-cursor": "a cursor kept open past the connection() block (issue 10 item 4)",
    "sqlite-close": "close() of the lent connection",
    # -- PostgreSQL -----------------------------------------------------------
    "pg-transaction-control": "BEGIN/COMMIT/ROLLBACK/SAVEPOINT/RELEASE/PREPARE TRANSACTION/"
    "SET/RESET in plan SQL (DESIGN 4)",
    "pg-comments": "COMMIT smuggled past the guard by a '--' comment ended by CR, or by nested "
    "/* */ comments (issue 14 item 3)",
    "pg-dollar-quotes": "COMMIT smuggled inside what the guard takes for a dollar quote "
    "(issue 14 item 3)",
    "pg-set-config": "SELECT set_config(..., false): session settings outliving the plan "
    "(issue 10 item 3)",
    "pg-temp-objects": "CREATE TEMP TABLE/VIEW shadowing real tables (issue 14 item 1)",
    "pg-session-objects": "PREPARE, DECLARE ... WITH HOLD, LISTEN: session objects outliving "
    "the plan (issue 14 item 1)",
    "pg-cursor-stream": "Cursor.stream(), ClientCursor, RawCursor: SQL that bypasses the "
    "guarded execute (issue 10 item 2)",
    "pg-libpq": "conn.pgconn.exec_(): SQL sent through libpq directly (issue 10 item 2)",
    "pg-close": "close() of the lent connection",
    # -- endings and errors (no statement of their own: the contract's outcome) --
    "poison-plan-wide": "a poisoned plan's next call raises on every database, also one it "
    "had not touched yet (DESIGN 4; off: such a call may open a transaction there, which "
    "the release throws away)",
    "pg-aborted-release": "release of a plan whose PostgreSQL lease is aborted commits "
    "nothing on any database (issue 10 item 5)",
    "pg-busy-in-block": "a lock timeout inside a connection() block raises ResourceBusyError "
    "(issue 10 item 10)",
}


def _literal(value: Any) -> str:
    return repr(value)


@dataclasses.dataclass(frozen=True)
class Sql:
    """One statement a plan runs through ``handler.execute()``.

    *txn*: running it would end the plan's transaction or change its
    savepoints on this engine, so the handler must refuse it or poison the
    plan; running it is never a correct outcome. *params* are bound as
    ``:name`` (the reference on PostgreSQL binds them as ``%(name)s``).
    """

    text: str
    family: str | None = None
    txn: bool = False
    params: tuple[tuple[str, Any], ...] | None = None

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # how hypothesis prints a failing example's steps

    def bound(self) -> dict[str, Any] | None:
        return dict(self.params) if self.params is not None else None

    def __repr__(self) -> str:
        extra = ""
        if self.family is not None:
            extra += f", family={self.family!r}"
        if self.txn:
            extra += ", txn=True"
        if self.params is not None:
            extra += f", params={self.params!r}"
        return f"Sql({self.text!r}{extra})"


@dataclasses.dataclass(frozen=True)
class Act:
    """One thing a tool does inside ``with handler.connection(...) as conn:``.

    *kind* is ``"sql"`` (``conn.execute(text)`` and fetch its rows) or one of
    the hostile things in :data:`ACTIONS`.
    """

    kind: str
    text: str = ""
    family: str | None = None
    txn: bool = False

    def __repr__(self) -> str:
        extra = f", family={self.family!r}" if self.family is not None else ""
        if self.txn:
            extra += ", txn=True"
        return f"Act({self.kind!r}, {self.text!r}{extra})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


# -- the schema, the same in every copy --------------------------------------

SQLITE_SCHEMA = (
    "CREATE TABLE items (k INTEGER PRIMARY KEY, v TEXT NOT NULL CHECK (length(v) <= 6))",
    "CREATE TABLE parent (k INTEGER PRIMARY KEY)",
    "CREATE TABLE child (k INTEGER PRIMARY KEY, "
    "p INTEGER REFERENCES parent (k) DEFERRABLE INITIALLY DEFERRED)",
    "CREATE TABLE strict (k INTEGER PRIMARY KEY ON CONFLICT ROLLBACK, "
    "v TEXT NOT NULL ON CONFLICT ROLLBACK)",
    "CREATE TABLE guarded (k INTEGER PRIMARY KEY, v TEXT)",
    "CREATE TRIGGER guard BEFORE INSERT ON guarded BEGIN SELECT CASE "
    "WHEN NEW.v = 'rollback' THEN RAISE(ROLLBACK, 'the trigger rolled back') "
    "WHEN NEW.v = 'abort' THEN RAISE(ABORT, 'the trigger aborted') END; END",
    "INSERT INTO items (k, v) VALUES (1, 'a')",
    "INSERT INTO parent (k) VALUES (1)",
    "INSERT INTO strict (k, v) VALUES (1, 'a')",
)

PG_SCHEMA = (
    "CREATE TABLE items (k integer PRIMARY KEY, v text NOT NULL CHECK (length(v) <= 6))",
    "CREATE TABLE parent (k integer PRIMARY KEY)",
    "CREATE TABLE child (k integer PRIMARY KEY, "
    "p integer REFERENCES parent (k) DEFERRABLE INITIALLY DEFERRED)",
    "INSERT INTO items (k, v) VALUES (1, 'a')",
    "INSERT INTO parent (k) VALUES (1)",
)

# -- statements ---------------------------------------------------------------

KEYS = st.integers(1, 4)
# 'a' and 'A' tell case_sensitive_like apart; 'toolong' breaks CHECK (length(v) <= 6).
VALUES = st.sampled_from(["a", "A", "b"])
BAD_VALUES = st.sampled_from(["NULL", "'toolong'"])


@st.composite
def _sql(
    draw: st.DrawFn,
    template: str,
    family: str | None = None,
    **strategies: st.SearchStrategy[Any],
) -> Sql:
    """A statement from *template*, its ``{name}`` fields drawn from *strategies*."""
    return Sql(template.format(**{name: draw(value) for name, value in strategies.items()}), family)


@st.composite
def _bound_insert(draw: st.DrawFn) -> Sql:
    """An INSERT whose values are bound as ``:name`` parameters."""
    return Sql(
        "INSERT INTO items (k, v) VALUES (:k, :v)",
        params=(("k", draw(KEYS)), ("v", draw(VALUES))),
    )


def _fixed(*texts: str, family: str | None = None, txn: bool = False) -> list[Sql]:
    return [Sql(text, family=family, txn=txn) for text in texts]


_BOUND = _bound_insert()


def ordinary_common() -> list[st.SearchStrategy[Sql]]:
    """Ordinary work, the same text on both engines: rows, constraints, failures, DDL.

    Statements that fail are one choice in eight or so (besides key conflicts):
    on PostgreSQL each one aborts the plan's transaction until ``rollback_to``.
    """
    return [
        _sql("INSERT INTO items (k, v) VALUES ({k}, '{v}')", k=KEYS, v=VALUES),
        _sql("INSERT INTO items (k, v) VALUES ({k}, {v})", k=KEYS, v=BAD_VALUES),
        _BOUND,
        _sql("UPDATE items SET v = '{v}' WHERE k = {k}", k=KEYS, v=VALUES),
        _sql("UPDATE items SET k = {k2} WHERE k = {k}", k=KEYS, k2=KEYS),
        _sql("DELETE FROM items WHERE k = {k}", k=KEYS),
        _sql("INSERT INTO parent (k) VALUES ({k})", k=KEYS),
        _sql("DELETE FROM parent WHERE k = {k}", k=KEYS),
        _sql("INSERT INTO child (k, p) VALUES ({k}, {p})", k=KEYS, p=KEYS),
        _sql("DELETE FROM child WHERE k = {k}", k=KEYS),
        _sql("INSERT INTO extra (x) VALUES ({k})", k=KEYS),
        st.sampled_from(
            _fixed(
                "SELECT k, v FROM items ORDER BY k",
                "SELECT count(*) FROM items WHERE v LIKE 'a%'",
                "SELECT k, p FROM child ORDER BY k",
                "CREATE TABLE extra (x INTEGER)",
                "DROP TABLE extra",
            )
        ),
        st.sampled_from(_fixed("SELEC k FROM items", "SELECT k FROM no_such_table")),
    ]


def sqlite_ordinary() -> list[st.SearchStrategy[Sql]]:
    return [
        *ordinary_common(),
        _sql(
            "INSERT OR {how} INTO items (k, v) VALUES ({k}, '{v}')",
            how=st.sampled_from(["IGNORE", "REPLACE", "ABORT", "FAIL"]),
            k=KEYS,
            v=VALUES,
        ),
        _sql("INSERT OR ABORT INTO strict (k, v) VALUES ({k}, 'a')", k=KEYS),
        _sql(
            "INSERT INTO guarded (k, v) VALUES ({k}, '{v}')",
            k=KEYS,
            v=st.sampled_from(["ok", "abort"]),
        ),
        st.sampled_from(
            _fixed(
                "SELECT k, v FROM strict ORDER BY k",
                "SELECT k, v FROM guarded ORDER BY k",
                "SELECT upper('a')",
                "SELECT type, name FROM sqlite_temp_master ORDER BY name",
                "PRAGMA user_version",
                "PRAGMA foreign_keys",
                "PRAGMA ignore_check_constraints",
                "PRAGMA automatic_index",
                "PRAGMA reverse_unordered_selects",
                "PRAGMA wal_autocheckpoint",
                "PRAGMA max_page_count",
                "PRAGMA cache_spill",
                "PRAGMA legacy_alter_table",
                "PRAGMA query_only",
                "PRAGMA recursive_triggers",
            )
        ),
    ]


def pg_ordinary() -> list[st.SearchStrategy[Sql]]:
    return [
        *ordinary_common(),
        st.sampled_from(
            _fixed(
                "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), "
                "current_setting('work_mem'), current_setting('default_transaction_read_only'), "
                # A custom setting once set stays defined as '' in its session.
                "coalesce(current_setting('cleveragents_model.flag', true), '')",
                "SELECT set_config('cleveragents_model.flag', 'local', true)",
                "SET LOCAL statement_timeout = '5s'",
                "SELECT relname FROM pg_class WHERE relnamespace = pg_my_temp_schema() "
                "AND relkind IN ('r', 'v') ORDER BY relname",
                "SELECT count(*) FROM pg_prepared_statements WHERE name = 'leaked'",
                "SELECT count(*) FROM pg_cursors WHERE name = 'leaked'",
                "SELECT count(*) FROM pg_listening_channels()",
                "SELECT k, v FROM items ORDER BY k FOR UPDATE",
            )
        ),
    ]


def sqlite_hostile() -> dict[str, list[st.SearchStrategy[Sql]]]:
    """Hostile statements by family (SQLite)."""
    control = "sqlite-transaction-control"
    comments = "sqlite-comments"
    return {
        control: [
            st.sampled_from(
                _fixed(
                    "COMMIT",
                    "commit transaction",
                    "END",
                    "ROLLBACK",
                    "BEGIN",
                    "BEGIN IMMEDIATE",
                    "SAVEPOINT mine",
                    "RELEASE mine",
                    'RELEASE "cp_1"',
                    "ROLLBACK TO cp_1",
                    "ROLLBACK TRANSACTION TO SAVEPOINT cp_2",
                    family=control,
                    txn=True,
                )
            )
        ],
        comments: [
            st.sampled_from(
                [
                    *_fixed(
                        "/* why */ COMMIT",
                        "-- why\nCOMMIT",
                        "/* a /* b */ COMMIT",
                        "\t\n COMMIT -- done",
                        "/**/ROLLBACK",
                        family=comments,
                        txn=True,
                    ),
                    # SQLite ends a '--' comment only at LF: these do nothing.
                    *_fixed(
                        "SELECT 1 --\r; COMMIT",
                        "--\rCOMMIT",
                        "SELECT '; COMMIT'",
                        "SELECT 1 /* ; COMMIT */",
                        "SELECT 1; COMMIT",
                        "/* a /* b */ */ COMMIT",
                        family=comments,
                    ),
                ]
            )
        ],
        "sqlite-or-rollback": [
            _sql(
                "INSERT OR ROLLBACK INTO items (k, v) VALUES ({k}, '{v}')",
                "sqlite-or-rollback",
                k=KEYS,
                v=VALUES,
            ),
            _sql(
                "UPDATE OR ROLLBACK items SET k = {k2} WHERE k = {k}",
                "sqlite-or-rollback",
                k=KEYS,
                k2=KEYS,
            ),
            _sql(
                "INSERT OR ROLLBACK INTO items (k, v) VALUES ({k}, NULL)",
                "sqlite-or-rollback",
                k=KEYS,
            ),
        ],
        "sqlite-conflict-rollback-table": [
            _sql(
                "INSERT INTO strict (k, v) VALUES ({k}, 'a')",
                "sqlite-conflict-rollback-table",
                k=KEYS,
            ),
            _sql(
                "INSERT INTO strict (k, v) VALUES ({k}, NULL)",
                "sqlite-conflict-rollback-table",
                k=KEYS,
            ),
            _sql(
                "UPDATE strict SET k = {k2} WHERE k = {k}",
                "sqlite-conflict-rollback-table",
                k=KEYS,
                k2=KEYS,
            ),
        ],
        "sqlite-raise-rollback": [
            _sql(
                "INSERT INTO guarded (k, v) VALUES ({k}, 'rollback')",
                "sqlite-raise-rollback",
                k=KEYS,
            ),
        ],
        "sqlite-pragmas": [
            st.sampled_from(
                _fixed(
                    "PRAGMA ignore_check_constraints = 1",
                    "PRAGMA case_sensitive_like = 1",
                    "PRAGMA max_page_count = 100000",
                    "PRAGMA wal_autocheckpoint = 0",
                    "PRAGMA wal_autocheckpoint(7)",
                    "PRAGMA automatic_index = 0",
                    "PRAGMA main.automatic_index = off",
                    "PRAGMA reverse_unordered_selects = 1",
                    "PRAGMA cache_spill = 0",
                    "PRAGMA legacy_alter_table = 1",
                    "PRAGMA defer_foreign_keys = 1",
                    "PRAGMA foreign_keys = 0",
                    "PRAGMA recursive_triggers = 1",
                    "PRAGMA query_only = 1",
                    "PRAGMA user_version = 7",
                    family="sqlite-pragmas",
                )
            )
        ],
        "sqlite-temp-objects": [
            st.sampled_from(
                _fixed(
                    "CREATE TEMP TABLE items (k INTEGER PRIMARY KEY, v TEXT)",
                    "CREATE TEMP TABLE items AS SELECT * FROM main.items",
                    "CREATE TEMP VIEW parent AS SELECT 99 AS k",
                    "CREATE TEMP TRIGGER hijack AFTER INSERT ON main.items BEGIN "
                    "UPDATE main.items SET v = 'hijack' WHERE k = NEW.k; END",
                    family="sqlite-temp-objects",
                )
            )
        ],
    }


def pg_hostile() -> dict[str, list[st.SearchStrategy[Sql]]]:
    """Hostile statements by family (PostgreSQL)."""
    control = "pg-transaction-control"
    comments = "pg-comments"
    dollars = "pg-dollar-quotes"
    return {
        control: [
            st.sampled_from(
                _fixed(
                    "COMMIT",
                    "commit",
                    "END",
                    "ROLLBACK",
                    "ABORT",
                    "BEGIN",
                    "START TRANSACTION",
                    "SAVEPOINT mine",
                    'RELEASE SAVEPOINT "cp_1"',
                    'ROLLBACK TO SAVEPOINT "cp_1"',
                    "COMMIT AND CHAIN",
                    "PREPARE TRANSACTION 'mine'",
                    "SELECT 1; COMMIT",
                    "SET lock_timeout = '30ms'",
                    "SET SESSION cleveragents_model.flag = 'leaked'",
                    "RESET ALL",
                    family=control,
                    txn=True,
                )
            )
        ],
        comments: [
            st.sampled_from(
                [
                    *_fixed(
                        "SELECT 1 --\r; COMMIT; BEGIN",
                        "SELECT 1 --\r; COMMIT",
                        "SELECT 1 --\n; COMMIT",
                        "-- why\nCOMMIT",
                        "/* a /* b */ */ COMMIT",
                        "/* a /* b */ */ COMMIT; BEGIN",
                        "/* why */ ROLLBACK",
                        family=comments,
                        txn=True,
                    ),
                    # Comments only: nothing to refuse (refusing is allowed too).
                    *_fixed(
                        "SELECT 1 -- ; COMMIT",
                        "SELECT 1 /* a /* b */ ; COMMIT */",
                        "/* COMMIT */ SELECT 1",
                        family=comments,
                    ),
                ]
            )
        ],
        dollars: [
            st.sampled_from(
                [
                    # An identifier may contain '$', and start with any non-ASCII
                    # letter: '→$$' is a name to PostgreSQL, not a dollar quote.
                    *_fixed(
                        "SELECT 1 AS →$$; COMMIT; SELECT 2 AS →$$",
                        "SELECT 1 AS é$$; ROLLBACK; BEGIN; SELECT 2 AS é$$",
                        family=dollars,
                        txn=True,
                    ),
                    *_fixed(
                        "SELECT $$; COMMIT; $$",
                        "SELECT $q$ $$; COMMIT; $$ $q$",
                        "SELECT E'\\'; COMMIT; --'",
                        "DO $$ BEGIN COMMIT; END $$",
                        family=dollars,
                    ),
                ]
            )
        ],
        "pg-set-config": [
            st.sampled_from(
                _fixed(
                    "SELECT set_config('lock_timeout', '30ms', false)",
                    "SELECT set_config('cleveragents_model.flag', 'leaked', false)",
                    "SELECT set_config('search_path', 'nowhere', false)",
                    "SELECT set_config('statement_timeout', '1234', false)",
                    "SELECT pg_catalog.set_config('work_mem', '64kB', false)",
                    "SELECT * FROM set_config('default_transaction_read_only', 'on', false)",
                    family="pg-set-config",
                )
            )
        ],
        "pg-temp-objects": [
            st.sampled_from(
                _fixed(
                    "CREATE TEMP TABLE items (k integer PRIMARY KEY, v text)",
                    "CREATE TEMP TABLE items AS SELECT * FROM items",
                    "CREATE TEMP VIEW parent AS SELECT 99 AS k",
                    "CREATE TEMP TABLE extra (x integer)",
                    family="pg-temp-objects",
                )
            )
        ],
        "pg-session-objects": [
            st.sampled_from(
                _fixed(
                    "PREPARE leaked AS SELECT 1",
                    "DECLARE leaked CURSOR WITH HOLD FOR SELECT 1",
                    "LISTEN leaked",
                    family="pg-session-objects",
                )
            )
        ],
    }


def sqlite_actions() -> dict[str, list[st.SearchStrategy[Act]]]:
    """Hostile things a tool does with a lent SQLite connection, by family."""
    return {
        "sqlite-connection-state": [
            st.sampled_from(
                [
                    Act("row_factory", family="sqlite-connection-state"),
                    Act("text_factory", family="sqlite-connection-state"),
                    Act("create_function", family="sqlite-connection-state"),
                ]
            )
        ],
        "sqlite-set-authorizer": [
            st.sampled_from(
                [
                    Act("set_authorizer", "None", family="sqlite-set-authorizer"),
                    Act("set_authorizer", "allow all", family="sqlite-set-authorizer"),
                ]
            )
        ],
        "sqlite-isolation-level": [
            st.just(Act("isolation_level", family="sqlite-isolation-level", txn=True))
        ],
        "sqlite-executescript": [
            _act(
                "executescript",
                "INSERT INTO items (k, v) VALUES ({k}, 'es')",
                "sqlite-executescript",
                k=KEYS,
            )
        ],
        "sqlite-kept-cursor": [
            st.just(Act("keep_cursor", "SELECT name FROM sqlite_master", "sqlite-kept-cursor"))
        ],
        "sqlite-close": [st.just(Act("close", family="sqlite-close", txn=True))],
    }


def pg_actions() -> dict[str, list[st.SearchStrategy[Act]]]:
    """Hostile things a tool does with a lent PostgreSQL connection, by family."""
    stream = "pg-cursor-stream"
    return {
        stream: [
            st.sampled_from(
                [
                    Act("stream", "COMMIT", stream, txn=True),
                    Act("stream", "ROLLBACK", stream, txn=True),
                    Act("client_cursor", "COMMIT", stream, txn=True),
                    Act("raw_cursor", "COMMIT", stream, txn=True),
                    Act(
                        "client_cursor",
                        "SELECT set_config('cleveragents_model.flag', 'x', false)",
                        stream,
                    ),
                ]
            )
        ],
        "pg-libpq": [
            st.sampled_from(
                [
                    Act("libpq", "COMMIT", "pg-libpq", txn=True),
                    Act("libpq", "COMMIT; BEGIN", "pg-libpq", txn=True),
                ]
            )
        ],
        "pg-close": [st.just(Act("close", family="pg-close", txn=True))],
    }


def statements(
    ordinary: list[st.SearchStrategy[Sql]],
    hostile: dict[str, list[st.SearchStrategy[Sql]]],
    enabled: Iterable[str],
) -> st.SearchStrategy[Sql]:
    """Ordinary statements most of the time, a hostile one of an enabled family now and then."""
    # Sorted: a set's order changes with PYTHONHASHSEED, and so would the examples.
    chosen = [strategy for name in sorted(enabled) for strategy in hostile.get(name, [])]
    plain = st.one_of(ordinary)
    if not chosen:
        return plain
    return st.one_of(plain, plain, plain, st.one_of(chosen))


@st.composite
def _act(
    draw: st.DrawFn, kind: str, template: str, family: str, **strategies: st.SearchStrategy[Any]
) -> Act:
    """A hostile act from *template*, its ``{name}`` fields drawn from *strategies*."""
    text = template.format(**{name: draw(value) for name, value in strategies.items()})
    return Act(kind, text, family, txn=True)


def as_act(sql: Sql) -> Act:
    """The same statement, run by a tool through ``conn.execute()``."""
    return Act("sql", sql.text, sql.family, sql.txn)


def without_params(ordinary: list[st.SearchStrategy[Sql]]) -> list[st.SearchStrategy[Sql]]:
    """The ordinary statements a tool runs as they are (parameters are bound by execute())."""
    return [strategy for strategy in ordinary if strategy is not _BOUND]


def _join(parts: tuple[list[Act], Act]) -> tuple[Act, ...]:
    return (*parts[0], parts[1])


def block_actions(
    ordinary: list[st.SearchStrategy[Sql]],
    hostile_sql: dict[str, list[st.SearchStrategy[Sql]]],
    hostile_acts: dict[str, list[st.SearchStrategy[Act]]],
    enabled: frozenset[str],
    *,
    only_hostile: bool = False,
) -> st.SearchStrategy[tuple[Act, ...]]:
    """What a tool does in one connection() block: 1-3 statements, maybe one hostile act last.

    With *only_hostile*, the last act is always hostile (an empty strategy when no
    enabled family has one).
    """
    plain = st.one_of(without_params(ordinary)).map(as_act)
    # Sorted: a set's order changes with PYTHONHASHSEED, and so would the examples.
    names = sorted(enabled)
    hostile = [strategy.map(as_act) for name in names for strategy in hostile_sql.get(name, [])]
    hostile += [strategy for name in names for strategy in hostile_acts.get(name, [])]
    if only_hostile:
        if not hostile:
            return st.nothing()
        return st.tuples(st.lists(plain, max_size=1), st.one_of(hostile)).map(_join)
    tail = st.one_of(plain, st.one_of(hostile)) if hostile else plain
    return st.tuples(st.lists(plain, max_size=2), tail).map(_join)


# -- the reference: the same engine, by hand -----------------------------------


def is_refusal(exc: BaseException) -> bool:
    """Whether *exc* is the handler (or its lent connection) refusing to do something."""
    from cleveragents.errors import ResourceError

    if isinstance(exc, ResourceError | AttributeError | TypeError | NotImplementedError):
        return True
    return isinstance(exc, sqlite3.DatabaseError) and "not authorized" in str(exc)


_TEMPLATE: str | None = None


class SQLiteReference:
    """SQLite by hand on one file: plain connections, the handler's statements typed out."""

    engine = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self.observer = sqlite3.connect(path, isolation_level=None, timeout=5)
        self.observer.execute("PRAGMA synchronous = off")
        self._seen: tuple[int, dict[str, Any]] | None = None
        # Cursors a tool kept past its block, by connection: like the handler's,
        # they stay open (and keep their statement) until the plan ends.
        self._kept: dict[sqlite3.Connection, list[sqlite3.Cursor]] = {}

    @staticmethod
    def create(path: str) -> None:
        """Make a database file with the model's schema: a copy of one made once per process."""
        global _TEMPLATE
        if _TEMPLATE is None:
            folder = tempfile.mkdtemp(prefix="cleveragents-model-template-")
            atexit.register(shutil.rmtree, folder, True)
            template = os.path.join(folder, "template.db")
            conn = sqlite3.connect(template, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = wal")
                conn.execute("PRAGMA synchronous = off")
                conn.execute("BEGIN")
                for ddl in SQLITE_SCHEMA:
                    conn.execute(ddl)
                conn.execute("COMMIT")
            finally:
                conn.close()  # the last connection: the WAL is merged and removed
            _TEMPLATE = template
        shutil.copyfile(_TEMPLATE, path)

    def open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5)
        conn.execute("PRAGMA synchronous = off")
        conn.execute("PRAGMA foreign_keys = on")
        return conn

    def begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def savepoint(self, conn: sqlite3.Connection, name: str) -> None:
        conn.execute(f'SAVEPOINT "{name}"')

    def rollback_to(self, conn: sqlite3.Connection, name: str) -> None:
        conn.execute(f'ROLLBACK TO "{name}"')

    def commit(self, conn: sqlite3.Connection) -> None:
        self._close_kept(conn)
        conn.execute("COMMIT")

    def rollback(self, conn: sqlite3.Connection) -> None:
        self._close_kept(conn)
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def in_transaction(self, conn: sqlite3.Connection) -> bool:
        return conn.in_transaction

    def aborted(self, conn: sqlite3.Connection) -> bool:
        return False

    def commit_would_fail(self, conn: sqlite3.Connection) -> bool:
        """Whether COMMIT would fail now: deferred foreign keys still violated."""
        if not conn.execute("PRAGMA foreign_keys").fetchone()[0]:
            return False
        return bool(conn.execute("PRAGMA foreign_key_check").fetchall())

    def run(self, conn: sqlite3.Connection, sql: Sql) -> list[Any]:
        params = sql.bound()
        return conn.execute(sql.text, params if params is not None else ()).fetchall()

    def act(self, conn: Any, act: Act) -> list[Any]:
        return run_sqlite_act(conn, act, kept=self._kept.setdefault(conn, []))

    def _close_kept(self, conn: Any) -> None:
        for cursor in self._kept.pop(conn, ()):
            cursor.close()

    def fingerprint(self, conn: Any, *, lent: bool = False) -> Any:
        return sqlite_fingerprint(conn, lent=lent)

    def close(self, conn: Any) -> None:
        self._close_kept(conn)
        conn.close()

    def write_outside(self, sql: str) -> None:
        """Commit *sql* from a connection of another program (not the handler's)."""
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5)
        try:
            conn.execute(sql)
        finally:
            conn.close()

    def snapshot(self) -> dict[str, Any]:
        """What is committed now; read again only when another connection committed."""
        version = self.observer.execute("PRAGMA data_version").fetchone()[0]
        if self._seen is None or self._seen[0] != version:
            self._seen = (version, sqlite_snapshot(self.observer))
        return self._seen[1]

    def dispose(self) -> None:
        self.observer.close()


def sqlite_snapshot(conn: sqlite3.Connection) -> dict[str, Any]:
    """Everything committed in an SQLite file, read through *conn* (autocommit)."""
    read = conn.execute
    found = {
        "schema": read(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
            "ORDER BY type, name"
        ).fetchall(),
        "user_version": read("PRAGMA user_version").fetchall(),
    }
    for table in ("items", "parent", "child", "strict", "guarded"):
        found[table] = read(f"SELECT * FROM main.{table} ORDER BY k").fetchall()
    if any(row[1] == "extra" for row in found["schema"]):
        found["extra"] = read("SELECT x FROM main.extra ORDER BY x").fetchall()
    return found


# Per-connection settings a plan or tool might change, read on every new lease:
# whatever one plan left on a pooled connection shows up in the next plan's.
_SQLITE_SETTINGS = (
    "ignore_check_constraints",
    "automatic_index",
    "reverse_unordered_selects",
    "wal_autocheckpoint",
    "max_page_count",
    "cache_size",
    "cache_spill",
    "legacy_alter_table",
    "foreign_keys",
    "query_only",
    "recursive_triggers",
    "defer_foreign_keys",
    "cell_size_check",
    "count_changes",
    "short_column_names",
    "full_column_names",
    "temp_store",
    "locking_mode",
    "trusted_schema",
    "writable_schema",
    "read_uncommitted",
    "fullfsync",
    "checkpoint_fullfsync",
    "journal_size_limit",
    "secure_delete",
    "threads",
    "analysis_limit",
)
_SQLITE_BEHAVIOUR = (
    "SELECT 'a' LIKE 'A', upper('a'), typeof('x'), "
    "(SELECT group_concat(type || ' ' || name, ', ') FROM temp.sqlite_master)"
)


def sqlite_fingerprint(conn: Any, *, lent: bool) -> dict[str, Any]:
    """What a plan finds on an SQLite connection: Python-side state, settings, TEMP objects.

    On a connection the handler *lent*, also whether its guard still refuses a
    SAVEPOINT (plan SQL may not touch savepoints): a tool's ``set_authorizer()``
    must not outlive its plan. A plain connection has no guard; the model expects
    the handler's answer, "refused".
    """
    found: dict[str, Any] = {
        "row_factory": conn.row_factory,
        "text_factory": conn.text_factory,
        "isolation_level": conn.isolation_level,
        "guard": _guard(conn) if lent else "refused",
    }
    for name in _SQLITE_SETTINGS:
        found[name] = [tuple(row) for row in conn.execute(f"PRAGMA {name}").fetchall()]
    found["behaviour"] = [tuple(row) for row in conn.execute(_SQLITE_BEHAVIOUR).fetchall()]
    return found


def _guard(conn: Any) -> str:
    """Whether the lent connection refuses a SAVEPOINT (harmless when it does not: released)."""
    try:
        conn.execute('SAVEPOINT "model_guard"')
    except sqlite3.DatabaseError:
        return "refused"
    conn.execute('RELEASE "model_guard"')
    return "ran"


_PG_FINGERPRINT = {
    "lock_timeout": "current_setting('lock_timeout')",
    "statement_timeout": "current_setting('statement_timeout')",
    "work_mem": "current_setting('work_mem')",
    "default_transaction_read_only": "current_setting('default_transaction_read_only')",
    "transaction_read_only": "current_setting('transaction_read_only')",
    "search_path": "current_setting('search_path')",
    "cleveragents_model.flag": "coalesce(current_setting('cleveragents_model.flag', true), '')",
    "DateStyle": "current_setting('DateStyle')",
    "TimeZone": "current_setting('TimeZone')",
    "client_min_messages": "current_setting('client_min_messages')",
    "temp objects": "(SELECT string_agg(relname, ', ' ORDER BY relname) FROM pg_class "
    "WHERE relnamespace = pg_my_temp_schema())",
    # psycopg prepares statements of its own (_pg3_N); the unnamed portal is the protocol's.
    "prepared statements": "(SELECT string_agg(name, ', ' ORDER BY name) "
    "FROM pg_prepared_statements WHERE name NOT LIKE '\\_pg3\\_%')",
    "cursors": "(SELECT string_agg(name, ', ' ORDER BY name) FROM pg_cursors WHERE name <> '')",
    "listening": "(SELECT string_agg(c, ', ' ORDER BY c) FROM pg_listening_channels() AS c)",
}
_PG_FINGERPRINT_SQL = "SELECT " + ", ".join(_PG_FINGERPRINT.values())


def pg_fingerprint(conn: Any, schema: str) -> dict[str, Any]:
    """What a plan finds in a PostgreSQL session: settings, TEMP objects, session objects.

    A custom setting once set (even with SET LOCAL) stays defined in the session
    as '' after its transaction: '' and unset are the same here.
    """
    row = conn.execute(_PG_FINGERPRINT_SQL).fetchone()
    # The two copies live in two schemas: the search_path differs by that name only.
    return {
        name: value.replace(schema, "<schema>") if isinstance(value, str) else value
        for name, value in zip(_PG_FINGERPRINT, row, strict=True)
    }


def _upper(value: Any) -> str:
    return "pwned"


def _keep_cursor(conn: Any, act: Act, kept: list[Any] | None) -> None:
    if kept is not None:
        cursor = conn.execute(act.text)
        cursor.fetchone()
        kept.append(cursor)


def _set_authorizer(conn: Any, act: Act, kept: list[Any] | None) -> None:
    conn.set_authorizer(None if act.text == "None" else (lambda *args: sqlite3.SQLITE_OK))


def _set(attribute: str, value: Any) -> Callable[[Any, Act, list[Any] | None], None]:
    return lambda conn, act, kept: setattr(conn, attribute, value)


#: What each hostile act does to an SQLite connection (the lent one, or the reference's).
_SQLITE_ACTS: dict[str, Callable[[Any, Act, list[Any] | None], Any]] = {
    "row_factory": _set("row_factory", sqlite3.Row),
    "text_factory": _set("text_factory", bytes),
    "isolation_level": _set("isolation_level", None),
    "create_function": lambda conn, act, kept: conn.create_function(
        "upper", 1, _upper, deterministic=True
    ),
    "set_authorizer": _set_authorizer,
    "executescript": lambda conn, act, kept: conn.executescript(act.text),
    "keep_cursor": _keep_cursor,
    "close": lambda conn, act, kept: conn.close(),
}


def run_sqlite_act(conn: Any, act: Act, kept: list[Any] | None) -> list[Any]:
    """Do *act* on an SQLite connection (the handler's lent one, or the reference's)."""
    if act.kind == "sql":
        return list(conn.execute(act.text).fetchall())
    _SQLITE_ACTS[act.kind](conn, act, kept)
    return []


class PostgreSQLReference:
    """PostgreSQL by hand on one schema: plain sessions, the handler's statements typed out."""

    engine = "postgresql"

    def __init__(self, base_dsn: str, schema: str, lock_timeout_ms: int) -> None:
        import psycopg

        self.pg = psycopg
        self.base_dsn = base_dsn
        self.schema = schema
        self.options = f"-c search_path={schema} -c lock_timeout={lock_timeout_ms}"
        self.observer = psycopg.connect(
            base_dsn, autocommit=True, options=f"-c search_path={schema} -c lock_timeout=2000"
        )

    def dsn(self) -> str:
        """The DSN a handler's resource uses to reach this schema."""
        return str(
            self.pg.conninfo.make_conninfo(self.base_dsn, options=f"-c search_path={self.schema}")
        )

    def open(self) -> Any:
        return self.pg.connect(self.base_dsn, autocommit=True, options=self.options)

    def begin(self, conn: Any) -> None:
        conn.execute("BEGIN")

    def savepoint(self, conn: Any, name: str) -> None:
        conn.execute(f'SAVEPOINT "{name}"')

    def rollback_to(self, conn: Any, name: str) -> None:
        conn.execute(f'ROLLBACK TO SAVEPOINT "{name}"')

    def commit(self, conn: Any) -> None:
        assert not self.aborted(conn), "the model never commits an aborted reference session"
        conn.execute("COMMIT")

    def rollback(self, conn: Any) -> None:
        if not conn.closed and self.in_transaction(conn):
            conn.execute("ROLLBACK")

    def status(self, conn: Any) -> Any:
        return conn.pgconn.transaction_status

    def in_transaction(self, conn: Any) -> bool:
        if conn.closed:
            return False
        status = self.pg.pq.TransactionStatus
        return self.status(conn) in (status.INTRANS, status.INERROR)

    def aborted(self, conn: Any) -> bool:
        return not conn.closed and self.status(conn) == self.pg.pq.TransactionStatus.INERROR

    def commit_would_fail(self, conn: Any) -> bool:
        """Whether COMMIT would fail now: aborted, or deferred constraints violated."""
        if self.aborted(conn):
            return True
        conn.execute('SAVEPOINT "check"')
        try:
            conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        except self.pg.Error:
            conn.execute('ROLLBACK TO SAVEPOINT "check"')
            return True
        conn.execute('ROLLBACK TO SAVEPOINT "check"')
        return False

    def run(self, conn: Any, sql: Sql) -> list[Any]:
        params = sql.bound()
        text = sql.text if params is None else re.sub(r":(\w+)", r"%(\1)s", sql.text)
        cursor = conn.execute(text, params)
        return cursor.fetchall() if cursor.description is not None else []

    def act(self, conn: Any, act: Act) -> list[Any]:
        if act.kind == "close":
            conn.close()
            return []
        # Whatever way the tool sent the SQL, the reference just runs it.
        cursor = conn.execute(act.text)
        return cursor.fetchall() if cursor.description is not None else []

    def fingerprint(self, conn: Any, *, lent: bool = False) -> Any:
        return pg_fingerprint(conn, self.schema)

    def close(self, conn: Any) -> None:
        conn.close()

    def snapshot(self) -> dict[str, Any]:
        row = self.observer.execute(PG_SNAPSHOT).fetchone()
        return dict(zip(("items", "parent", "child", "tables"), row, strict=True))

    def dispose(self) -> None:
        self.observer.close()


PG_SNAPSHOT = """
SELECT
  (SELECT coalesce(json_agg(json_build_array(k, v) ORDER BY k), '[]') FROM items),
  (SELECT coalesce(json_agg(k ORDER BY k), '[]') FROM parent),
  (SELECT coalesce(json_agg(json_build_array(k, p) ORDER BY k), '[]') FROM child),
  (SELECT coalesce(json_agg(relname ORDER BY relname), '[]') FROM pg_class
     WHERE relnamespace = current_schema()::regnamespace AND relkind IN ('r', 'v'))
"""


def run_pg_act(conn: Any, act: Act) -> list[Any]:
    """Do *act* on the PostgreSQL connection the handler lent."""
    import psycopg

    kind = act.kind
    if kind == "sql":
        cursor = conn.execute(act.text)
        return cursor.fetchall() if cursor.description is not None else []
    if kind == "stream":
        return list(conn.cursor().stream(act.text))
    if kind in ("client_cursor", "raw_cursor"):
        factory = psycopg.ClientCursor if kind == "client_cursor" else psycopg.RawCursor
        cursor = factory(conn)
        cursor.execute(act.text)
        return cursor.fetchall() if cursor.description is not None else []
    if kind == "libpq":
        conn.pgconn.exec_(act.text.encode())
        return []
    if kind == "close":
        conn.close()
        return []
    raise AssertionError(f"unknown act {act!r}")


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))
