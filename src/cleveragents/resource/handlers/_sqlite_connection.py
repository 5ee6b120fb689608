"""The connection SQLite lends a plan, and the guard that keeps the plan inside its transaction.

What keeps a plan inside its transaction, and the next plan free of this one:

* an authorizer, consulted whenever SQLite prepares a statement, whatever the
  route: it refuses what would end or split the transaction, open other files
  or change a connection setting that would outlive the plan (pragmas are
  allowed by name), and any statement at all once the transaction is gone;
* the lent connection's own methods, and the :class:`PlanCursor` objects it
  hands out, which refuse to run anything outside the plan's transaction:
  sqlite3 caches prepared statements, and a cached one re-run after SQLite
  ended the transaction (``INSERT OR ROLLBACK``, a trigger's
  ``RAISE(ROLLBACK)``, an interrupted write) is not shown to the authorizer;
* :meth:`PlanConnection.trouble`, through which the engine tells the handler
  the transaction is gone (so it poisons the plan), making every cached
  statement go through the authorizer again;
* :meth:`PlanConnection.back_to_pool` at check-in, which puts back what a tool
  may change on the connection object, drops TEMP objects, and says so when
  the connection must be closed and replaced (a tool's SQL function, the
  authorizer taken off it); the engine closes the plan's cursors and blobs
  when it commits or rolls back.

What is left to Python code that means to get past it (it could as well open
the file itself): calling ``sqlite3.Connection``'s methods unbound on the lent
object skips the method checks, so such a call can re-run a cached statement
after the transaction ended, until the handler learns of it at the end of the
block; and the same object is the next plan's connection, so a reference kept
past a plan is that plan's connection while it lasts (its cursors are not).
"""

from __future__ import annotations

import functools
import secrets
import sqlite3
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Literal, NoReturn, Self, cast

from cleveragents.errors import ResourceError
from cleveragents.resource.handlers.engine import OWNS_TRANSACTION, PlanConnectionMixin

# The handler's own statements carry this per-process tag. sqlite3 caches
# prepared statements by their text, and SQLite consults the authorizer only
# when a statement is prepared: without the tag, a plan's "COMMIT" could reuse
# the handler's cached, already-authorized one.
OWN = f"/* cleveragents {secrets.token_hex(8)} */ "
_TEMP_STORE = OWN + "PRAGMA temp_store"

# The driver's own methods, for the handler's statements and for plan SQL that
# was checked already (the lent connection's overrides would check again).
driver_execute = sqlite3.Connection.execute
_cursor = sqlite3.Connection.cursor
_cursor_execute = sqlite3.Cursor.execute
_set_authorizer = sqlite3.Connection.set_authorizer
getrefcount = sys.getrefcount
_ROW_FACTORY = sqlite3.Connection.__dict__["row_factory"]
_TEXT_FACTORY = sqlite3.Connection.__dict__["text_factory"]
_ISOLATION_LEVEL = sqlite3.Connection.__dict__["isolation_level"]

# What a plan's SQL may not do: end or split the plan's transaction, or open
# other database files (ATTACH would escape the allowed folders).
_FILES = "a plan reaches databases only through its resources"
_SETTINGS = "connection settings come from the resource and must not outlive the plan"
_REFUSED = {
    sqlite3.SQLITE_TRANSACTION: ("BEGIN, COMMIT, END or ROLLBACK", OWNS_TRANSACTION),
    sqlite3.SQLITE_SAVEPOINT: ("SAVEPOINT, RELEASE or ROLLBACK TO", OWNS_TRANSACTION),
    sqlite3.SQLITE_ATTACH: ("ATTACH", _FILES),
    sqlite3.SQLITE_DETACH: ("DETACH", _FILES),
}
# The pragmas a plan may run with an argument: queries, and settings that end
# with the plan's transaction or are stored in (and committed with) the
# database. Every other one set on a pooled connection would reach the plans
# after it (ignore_check_constraints, case_sensitive_like, query_only, ...).
# Pragmas without an argument only read, or act inside the transaction.
_PLAN_PRAGMAS = frozenset(
    {
        # queries
        "foreign_key_check",
        "foreign_key_list",
        "index_info",
        "index_list",
        "index_xinfo",
        "integrity_check",
        "quick_check",
        "table_info",
        "table_list",
        "table_xinfo",
        # reset at the end of every transaction
        "defer_foreign_keys",
        # stored in the database file, inside the transaction
        "application_id",
        "incremental_vacuum",
        "user_version",
    }
)
# Actions on the TEMP schema that only read it; any other one may leave a TEMP
# object behind, which would shadow main tables for the plans after this one.
_READS = frozenset({sqlite3.SQLITE_READ, sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION})

#: Why a plan's transaction on SQLite is gone, when SQLite itself ended it.
LOST = (
    "SQLite rolled back the plan's transaction (an OR ROLLBACK conflict clause, a "
    "trigger's RAISE(ROLLBACK), an interrupted write or an I/O error ends it)"
)
_NOT_LENT = (
    "this connection is not lent to a plan any more: a plan's connection works only "
    "inside its plan; take it from connection() again"
)
_STALE_CURSOR = (
    "this cursor belongs to a plan that has ended: take a new one from the plan's connection"
)
_GUARD_REMOVED = (
    "the handler's authorizer was taken off the plan's connection "
    "(sqlite3.Connection.set_authorizer called on it directly), so its statements went "
    "unchecked"
)
CLOSED = "the plan's connection was closed under it"
_NO_SCRIPTS = (
    "a plan's connection cannot executescript(): it would COMMIT the plan's transaction "
    "first; run the statements one by one with execute()"
)
_NO_CLOSE = "a plan's connection cannot close(): cleveragents gives it back when the plan ends"
_NO_DESERIALIZE = (
    "a plan's connection cannot deserialize(): it would replace the database of a pooled connection"
)
_NO_BACKUP = (
    "a plan's connection cannot backup(): SQLite cannot copy a database from a connection "
    "inside a write transaction, and sqlite3 would wait for it forever"
)
_NO_EXTENSIONS = "a plan's connection cannot load extensions: they would outlive the plan"
# The references to PlanConnection._guard while it is SQLite's authorizer: the
# connection's attribute, sqlite3's callback context and getrefcount's argument.
GUARD_REFS = 3

_IsolationLevel = Literal["DEFERRED", "EXCLUSIVE", "IMMEDIATE"] | None
Authorizer = Callable[[int, str | None, str | None, str | None, str | None], int]


class PlanCursor(sqlite3.Cursor):
    """A cursor of a plan's connection: it runs statements only inside the plan that made it.

    Kept past its plan, it refuses to run anything (so it cannot write outside
    the plan, or into the next plan's transaction), and whatever it still had
    to fetch is closed when the plan ends.
    """

    #: The lending of its connection it belongs to; set when the connection hands it out.
    generation = -1

    def execute(self, sql: str, parameters: Any = (), /) -> Self:
        conn: PlanConnection = self.connection  # type: ignore[assignment]
        if self.generation != conn.generation or not conn.in_transaction:
            conn.check_lent(self.generation)
        try:
            super().execute(sql, parameters)
        except BaseException:
            # The frames of a traceback the caller keeps keep their locals: this
            # one must not keep the cursor's statement, which keeps SQLite's
            # files open after the connection is closed.
            del self
            raise
        if self.description is not None:  # rows to fetch: an open statement
            conn.track(self)
        return self

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> Self:
        conn: PlanConnection = self.connection  # type: ignore[assignment]
        conn.check_lent(self.generation)
        try:
            return super().executemany(sql, seq_of_parameters)
        except BaseException:
            del self  # as in execute()
            raise

    def executescript(self, sql_script: str, /) -> NoReturn:
        raise ResourceError(_NO_SCRIPTS)


@functools.lru_cache(maxsize=16)
def _plan_cursor_class(factory: Any) -> type[PlanCursor]:
    """Return a cursor class that is both *factory* and a :class:`PlanCursor`."""
    if not (isinstance(factory, type) and issubclass(factory, sqlite3.Cursor)):
        raise TypeError(
            f"a plan's connection makes cursors of sqlite3.Cursor subclasses, not {factory!r}"
        )
    if issubclass(factory, PlanCursor):
        return factory
    return cast(type[PlanCursor], type(f"Plan{factory.__name__}", (PlanCursor, factory), {}))


class _Guard:
    """The authorizer SQLite calls: the connection's own check, reached weakly.

    A bound method kept on the connection would make a reference cycle, and a
    closed connection in one keeps SQLite's files open until the garbage
    collector runs.
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: PlanConnection) -> None:
        self._conn = weakref.ref(conn)

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None
    ) -> int:
        conn = self._conn()
        assert conn is not None  # SQLite asks only while the connection prepares a statement
        return conn.authorize(action, arg1, arg2, db, trigger)


class PlanConnection(PlanConnectionMixin, sqlite3.Connection):
    """A plan's connection: an ``sqlite3.Connection`` whose transaction the handler owns.

    An authorizer refuses, in any statement the plan runs, what would end the
    plan's transaction (``COMMIT``, ``ROLLBACK``, ``RELEASE``...), attach other
    files, or change connection settings that would outlive the plan; and,
    once the transaction is gone, every statement. ``commit()``,
    ``rollback()``, ``close()``, ``executescript()``, ``backup()``,
    ``deserialize()`` and ``with conn:`` are refused; what a tool may set on
    the connection (``row_factory``, its own authorizer, trace and progress
    callbacks, limits, SQL functions) is put back, or the connection
    replaced, when the plan gives it back.
    """

    # Slots: these are read and set on every plan's path, and a slot is quicker.
    __slots__ = (
        "_changed",
        "_guard",
        "_handles",
        "_limits",
        "_prune_at",
        "_tool_authorizer",
        "_unguarded",
        "generation",
        "lent",
        "lost",
        "memory",
        "refused",
        "unfit",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused: tuple[str, str] | None = None  # what the authorizer last refused, why
        #: Whether a plan holds the connection (from BEGIN until it is given back).
        self.lent = False
        #: Changes whenever the connection is lent or given back: a cursor of another
        #: generation belongs to a plan that has ended.
        self.generation = 0
        #: Why the connection must not be lent again, once known.
        self.unfit: str | None = None
        #: Whether it is a ``:memory:`` database: never replaced, so never made unfit.
        self.memory = False
        self._unguarded = False  # the handler's authorizer was taken off it
        #: Whether the plan's transaction is known to be gone (statements expired once).
        self.lost = False
        self._handles: list[weakref.ref[Any]] = []  # open cursors and blobs of the plan
        self._prune_at = 64
        self._changed: set[str] = set()  # what a tool changed that check-in puts back
        self._limits: dict[int, int] = {}  # limits a tool changed, with their old values
        self._tool_authorizer: Authorizer | None = None
        self._guard = _Guard(self)  # one object, so its reference count tells
        _set_authorizer(self, self._guard)

    # -- the guard ------------------------------------------------------------------

    def authorize(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None
    ) -> int:
        """Answer SQLite's question whether the statement being prepared may do *action*."""
        if self.handler_statement:
            return sqlite3.SQLITE_OK
        if not self.in_transaction:
            self.refused = ("any statement", LOST if self.lent else _NOT_LENT)
            return sqlite3.SQLITE_DENY
        refused = _REFUSED.get(action)
        if refused is None:
            if action == sqlite3.SQLITE_PRAGMA:
                if arg2 is not None and (arg1 or "").lower() not in _PLAN_PRAGMAS:
                    refused = (f"PRAGMA {arg1} = ...", _SETTINGS)
            elif db == "temp" and action not in _READS:
                self._changed.add("temp")
        if refused is not None:
            self.refused = refused
            return sqlite3.SQLITE_DENY
        tool = self._tool_authorizer
        return sqlite3.SQLITE_OK if tool is None else tool(action, arg1, arg2, db, trigger)

    def _guard_intact(self) -> bool:
        """Whether the handler's authorizer is still SQLite's (it cannot be read back)."""
        return getrefcount(self._guard) == GUARD_REFS

    def _expire_statements(self) -> None:
        """Make SQLite prepare every cached statement again, through the authorizer.

        It sets the handler's authorizer again, so first it notes whether
        someone had taken it off.
        """
        if not self._guard_intact():
            self._unguarded = True
        _set_authorizer(self, self._guard)

    def trouble(self) -> str | None:
        """Return why the plan's work here cannot go on or be committed, or ``None``.

        :raises sqlite3.ProgrammingError: the connection was closed.
        """
        in_transaction = self.in_transaction
        if not self._guard_intact():
            self._unguarded = True
        if self._unguarded:
            return _GUARD_REMOVED
        if in_transaction:
            return None
        if not self.lost:
            self.lost = True
            self._expire_statements()  # cached statements cannot run unchecked any more
        return LOST

    def check_lent(self, generation: int | None = None) -> None:
        """Raise unless a plan holds the connection and is inside its transaction.

        With *generation*, also unless the caller (a cursor) belongs to that plan.
        """
        if generation is not None and (generation != self.generation or not self.lent):
            raise ResourceError(_STALE_CURSOR)
        if not self.in_transaction:
            raise ResourceError(f"{LOST}; nothing more runs on it" if self.lent else _NOT_LENT)

    def track(self, handle: Any) -> None:
        """Remember an open cursor or blob of the plan, to close it when the plan ends."""
        handles = self._handles
        if len(handles) >= self._prune_at:
            handles[:] = [ref for ref in handles if ref() is not None]
            self._prune_at = max(64, 2 * len(handles))
        handles.append(weakref.ref(handle))

    # -- the handler's side -----------------------------------------------------------

    def own(self, sql: str) -> None:
        """Run one of the handler's own statements (BEGIN, SAVEPOINT, COMMIT...)."""
        self.handler_statement = True
        try:
            driver_execute(self, sql)
        finally:
            self.handler_statement = False

    def close_handles(self) -> None:
        """Close the plan's open cursors and blobs, so nothing holds a snapshot or a statement."""
        handles, self._handles = self._handles, []
        for ref in handles:
            handle = ref()
            if handle is not None:
                handle.close()

    def back_to_pool(self) -> bool:
        """Undo what the plan left on the connection; return whether it may be lent again."""
        if self.in_transaction:
            return False
        self.lent = False  # the plan's cursors run nothing more (commit closed them)
        if self._changed:
            self._put_back()
        return self.unfit is None and not self._unguarded and getrefcount(self._guard) == GUARD_REFS

    def _put_back(self) -> None:
        """Undo a tool's changes to the connection and drop TEMP objects (the rare path).

        :raises sqlite3.Error: something could not be undone; the connection must go.
        """
        changed, self._changed = self._changed, set()
        if "factories" in changed:
            _ROW_FACTORY.__set__(self, None)
            _TEXT_FACTORY.__set__(self, str)
            _ISOLATION_LEVEL.__set__(self, None)
        if "authorizer" in changed:
            # Statements prepared under the tool's rules (SQLITE_IGNORE reads NULL)
            # must not be reused under the handler's alone.
            self._tool_authorizer = None
            self._expire_statements()
        if "progress" in changed:
            sqlite3.Connection.set_progress_handler(self, None, 0)
        if "trace" in changed:
            sqlite3.Connection.set_trace_callback(self, None)
        if "limits" in changed:
            for category, limit in self._limits.items():
                sqlite3.Connection.setlimit(self, category, limit)
            self._limits.clear()
        if "temp" in changed:
            self._drop_temp()

    def _drop_temp(self) -> None:
        """Drop every TEMP table, view, index and trigger.

        SQLite deletes them all whenever ``temp_store`` changes (it fails instead
        while a statement still reads one), so it is changed and set back.
        """
        self.handler_statement = True
        try:
            (store,) = driver_execute(self, _TEMP_STORE).fetchone()
            driver_execute(self, f"{_TEMP_STORE} = {2 if store != 2 else 1}")
            driver_execute(self, f"{_TEMP_STORE} = {store}")
        finally:
            self.handler_statement = False
        self._expire_statements()  # a cached CREATE TEMP is noticed again next time

    # -- what a tool may call -----------------------------------------------------------

    # The driver's own attributes, noted when set, so that check-in need not read them.

    @property
    def row_factory(self) -> Any:
        return _ROW_FACTORY.__get__(self)

    @row_factory.setter
    def row_factory(self, value: Any) -> None:
        _ROW_FACTORY.__set__(self, value)
        self._changed.add("factories")

    @property
    def text_factory(self) -> Any:
        return _TEXT_FACTORY.__get__(self)

    @text_factory.setter
    def text_factory(self, value: Any) -> None:
        _TEXT_FACTORY.__set__(self, value)
        self._changed.add("factories")

    @property
    def isolation_level(self) -> _IsolationLevel:
        return cast(_IsolationLevel, _ISOLATION_LEVEL.__get__(self))

    @isolation_level.setter
    def isolation_level(self, value: _IsolationLevel) -> None:
        _ISOLATION_LEVEL.__set__(self, value)
        self._changed.add("factories")

    def cursor(self, factory: Any = None) -> Any:
        cls = PlanCursor if factory is None else _plan_cursor_class(factory)
        cursor = _cursor(self, cls)  # the driver's: it also hands on row_factory
        cursor.generation = self.generation
        return cursor

    def execute(self, sql: str, parameters: Any = (), /) -> PlanCursor:
        # PlanCursor.execute, inline: this is how most tools run their SQL.
        if not self.in_transaction:
            self.check_lent()
        cursor = _cursor(self, PlanCursor)
        cursor.generation = self.generation
        try:
            _cursor_execute(cursor, sql, parameters)
        except BaseException:
            del cursor  # as in PlanCursor.execute()
            raise
        if cursor.description is not None:
            self.track(cursor)
        return cursor

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> PlanCursor:
        cursor = _cursor(self, PlanCursor)
        cursor.generation = self.generation
        try:
            return cursor.executemany(sql, parameters)
        except BaseException:
            del cursor  # as in PlanCursor.execute()
            raise

    def executescript(self, sql_script: str, /) -> NoReturn:
        raise ResourceError(_NO_SCRIPTS)

    def blobopen(
        self, table: str, column: str, row: int, /, *, readonly: bool = False, name: str = "main"
    ) -> sqlite3.Blob:
        self.check_lent()
        blob = super().blobopen(table, column, row, readonly=readonly, name=name)
        self.track(blob)
        return blob

    def backup(self, target: sqlite3.Connection, **options: Any) -> NoReturn:
        raise ResourceError(_NO_BACKUP)

    def deserialize(self, data: Any, /, *, name: str = "main") -> NoReturn:
        raise ResourceError(_NO_DESERIALIZE)

    def close(self) -> NoReturn:
        raise ResourceError(_NO_CLOSE)

    def enable_load_extension(self, enable: bool, /) -> NoReturn:
        raise ResourceError(_NO_EXTENSIONS)

    def load_extension(self, name: str, /) -> NoReturn:
        raise ResourceError(_NO_EXTENSIONS)

    def set_authorizer(self, authorizer_callback: Authorizer | None) -> None:
        """Add *authorizer_callback* to the handler's checks (``None`` removes it again)."""
        self.check_lent()
        self._tool_authorizer = authorizer_callback
        self._changed.add("authorizer")
        self._expire_statements()  # as SQLite does: what was prepared is checked again

    def set_progress_handler(self, progress_handler: Any, n: int) -> None:
        self.check_lent()
        self._changed.add("progress")
        super().set_progress_handler(progress_handler, n)

    def set_trace_callback(self, trace_callback: Any) -> None:
        self.check_lent()
        self._changed.add("trace")
        super().set_trace_callback(trace_callback)

    def setlimit(self, category: int, limit: int, /) -> int:
        self.check_lent()
        old = super().setlimit(category, limit)
        self._limits.setdefault(category, old)
        self._changed.add("limits")
        return old

    # SQL functions and collations cannot be taken off a connection again with
    # certainty (create_function(name, n, None) leaves a function that fails),
    # so a connection that got one is closed when its plan ends.

    def create_function(
        self, name: str, narg: int, func: Any, *, deterministic: bool = False
    ) -> None:
        self._will_be_replaced(f"create_function({name!r})")
        super().create_function(name, narg, func, deterministic=deterministic)

    def create_aggregate(self, name: str, n_arg: int, aggregate_class: Any) -> None:
        self._will_be_replaced(f"create_aggregate({name!r})")
        super().create_aggregate(name, n_arg, aggregate_class)

    def create_window_function(self, name: str, num_params: int, aggregate_class: Any, /) -> None:
        self._will_be_replaced(f"create_window_function({name!r})")
        super().create_window_function(name, num_params, aggregate_class)

    def create_collation(self, name: str, callback: Any, /) -> None:
        self._will_be_replaced(f"create_collation({name!r})")
        super().create_collation(name, callback)

    def _will_be_replaced(self, why: str) -> None:
        self.check_lent()
        if self.memory:
            raise ResourceError(
                f"a plan's connection to a ':memory:' database cannot take {why}: the database "
                "lives in that one connection, shared by every plan, so it could not be undone"
            )
        if self.unfit is None:
            self.unfit = f"a tool called {why} on it"


def refusal(conn: PlanConnection) -> ResourceError | None:
    """Turn the authorizer's last refusal into the error a plan author can act on."""
    refused, conn.refused = conn.refused, None
    if refused is None:
        return None
    what, why = refused
    return ResourceError(f"plans may not run {what}: {why}")
