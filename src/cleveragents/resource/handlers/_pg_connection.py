"""The session PostgreSQL lends to a plan: a psycopg connection whose statements are read first.

PostgreSQL has no authorizer, so every statement a plan's cursors are about to
send is read as the server's lexer would (:mod:`._pgsql`) and refused if it
would end the plan's transaction or change the session for the next plan. What
the lent connection itself would do to the transaction (``commit()``,
``transaction()``, autocommit...) is refused outright. The engine
(:mod:`.postgresql`) notices what gets past this anyway.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from cleveragents.errors import ResourceError
from cleveragents.resource.handlers._pgsql import NAME_CHARS, Unreadable, outline, tokens
from cleveragents.resource.handlers.engine import OWNS_TRANSACTION, PlanConnectionMixin

if TYPE_CHECKING:
    from types import ModuleType


@dataclasses.dataclass(slots=True)
class _Session:
    """What the engine knows of one session it lent to plans."""

    #: Idle seconds after which the session is asked, before a commit, whether it still lives.
    verify_after: float = 0.0
    #: The token set in the plan's transaction at BEGIN (see _TOKEN_SETTING).
    token: bytes | None = None
    #: The application_name the server reported once the plan's transaction began.
    marker: bytes | None = None
    #: When the engine last saw a statement sent (monotonic; never later than the truth).
    last_active: float = 0.0
    #: Whether nothing of any plan is left on the session: it may be pooled.
    clean: bool = True
    #: Why the plan's transaction is gone, once noticed.
    lost: str | None = None
    #: Whether the plan declared cursors (WITH HOLD ones outlive its transaction).
    declared: bool = False
    #: Whether the plan prepared or deallocated statements (which outlive its transaction).
    prepared: bool = False
    #: psycopg's prepare_threshold and prepared_max when the session was opened.
    prepare: tuple[int | None, int | None] = (5, 100)


_CANNOT_NEST = (
    "a plan's connection cannot open conn.transaction(): cleveragents owns the plan's "
    "transaction; take a checkpoint instead"
)
_CANNOT_CLOSE = (
    "a plan's connection cannot close(): cleveragents gives the session back to its pool "
    "when the plan ends"
)
_CANNOT_TPC = (
    "a plan's connection cannot run two-phase commit (tpc_*): cleveragents owns the plan's "
    "transaction"
)


def _cannot_change(what: str) -> str:
    return (
        f"a plan's connection cannot change {what}: cleveragents owns the plan's "
        "transaction and how it runs"
    )


def _check_sql(conn: Any, query: Any, encoding: str) -> None:
    """Refuse, before it is sent, a plan's statement that would escape its transaction.

    *query* is what psycopg is about to send (bytes in the client encoding,
    placeholders already turned into ``$1``), or a string or composition.
    """
    if conn.handler_statement:
        return
    # Before the statement runs: the idle time measured from here is never too short.
    conn.plan_session.last_active = time.monotonic()
    if isinstance(query, bytes):
        try:
            query = query.decode(encoding)
        except UnicodeDecodeError:
            raise ResourceError(
                "plans may not run SQL that does not decode in the session's client "
                f"encoding ({encoding}): it cannot be read with certainty"
            ) from None
    elif not isinstance(query, str):
        query = query.as_string(conn)  # a psycopg.sql composition
    standard = conn.pgconn.parameter_status(b"standard_conforming_strings") != b"off"
    refusal, first = _read(query, standard)
    if refusal is not None:
        raise ResourceError(f"plans may not run {refusal}")
    if first == "DECLARE":
        conn.plan_session.declared = True
    elif first in _PREPARING:
        conn.plan_session.prepared = True


class _GuardedCursor:
    """Listed before a psycopg cursor class: reads every statement it is about to send.

    Every way a cursor sends SQL (``execute``, ``executemany``, ``stream``,
    ``copy``, a server-side cursor's ``DECLARE``, a pipeline) goes through
    ``_execute_send`` or ``_send_prepare``.
    """

    def _execute_send(self, query: Any, **options: Any) -> None:
        _check_sql(self._conn, query.query, self._encoding)  # type: ignore[attr-defined]
        super()._execute_send(query, **options)  # type: ignore[misc]

    def _send_prepare(self, name: bytes, query: Any) -> None:
        _check_sql(self._conn, query.query, self._encoding)  # type: ignore[attr-defined]
        super()._send_prepare(name, query)  # type: ignore[misc]


@functools.lru_cache(maxsize=64)
def _guarded(cursor_class: type[Any]) -> type[Any]:
    """Return *cursor_class* with the guard in front (itself if it has it already)."""
    if issubclass(cursor_class, _GuardedCursor):
        return cursor_class
    guarded = type(f"Plan{cursor_class.__name__}", (_GuardedCursor, cursor_class), {})
    guarded.__module__ = __name__
    return guarded


def _cursor_factory(name: str) -> property:
    """A cursor factory attribute of the lent connection that only holds guarded classes."""
    slot = f"_plan_{name}"

    def get(conn: Any) -> Any:
        return getattr(conn, slot)

    def set_(conn: Any, cursor_class: Any) -> None:
        if not isinstance(cursor_class, type):
            raise ResourceError(
                f"a plan's connection takes a psycopg cursor class as {name}, "
                f"not {type(cursor_class).__name__}"
            )
        setattr(conn, slot, _guarded(cursor_class))

    return property(get, set_, doc=f"The {name}; every class set is given the guard.")


@functools.cache
def _plan_connection_class(psycopg: ModuleType) -> type[Any]:
    """Return the ``psycopg.Connection`` subclass the handler lends to plans.

    It refuses ``commit()``, ``rollback()``, ``with conn:``, ``close()``,
    ``transaction()``, two-phase commit and changing autocommit or the
    transaction characteristics; its cursors, whichever class they are, read
    each statement before sending it (see :func:`_refusal`).
    """

    class PlanConnection(PlanConnectionMixin, psycopg.Connection):  # type: ignore[misc,name-defined]
        """A plan's session: a ``psycopg.Connection`` whose transaction the handler owns."""

        cursor_factory = _cursor_factory("cursor_factory")
        server_cursor_factory = _cursor_factory("server_cursor_factory")

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.plan_session = _Session()
            super().__init__(*args, **kwargs)

        def _exec_command(self, command: Any, *args: Any, **kwargs: Any) -> Any:
            # psycopg's own statements: FETCH/CLOSE of server-side cursors, DEALLOCATE...
            _check_sql(self, command, self.pgconn._encoding)
            return super()._exec_command(command, *args, **kwargs)

        def transaction(self, *args: Any, **kwargs: Any) -> NoReturn:
            raise ResourceError(_CANNOT_NEST)

        def close(self) -> NoReturn:
            raise ResourceError(_CANNOT_CLOSE)

        def set_autocommit(self, value: Any) -> NoReturn:
            raise ResourceError(_cannot_change("autocommit"))

        def set_isolation_level(self, value: Any) -> NoReturn:
            raise ResourceError(_cannot_change("isolation_level"))

        def set_read_only(self, value: Any) -> NoReturn:
            raise ResourceError(_cannot_change("read_only"))

        def set_deferrable(self, value: Any) -> NoReturn:
            raise ResourceError(_cannot_change("deferrable"))

        def tpc_begin(self, *args: Any) -> NoReturn:
            raise ResourceError(_CANNOT_TPC)

        tpc_prepare = tpc_commit = tpc_rollback = tpc_begin

    PlanConnection.__qualname__ = PlanConnection.__name__
    return PlanConnection


@functools.lru_cache(maxsize=512)
def _to_pyformat(sql: str, style: Literal["named", "qmark"]) -> str:
    """Rewrite ``:name`` (or ``?``) placeholders as psycopg's, and double literal ``%``.

    The SQL is read as PostgreSQL reads it (see :mod:`._pgsql`): quoted
    strings, quoted names, dollar-quoted bodies and comments are left alone,
    and so is the ``::`` cast.

    :raises ResourceError: the SQL cannot be read with certainty.
    """
    try:
        found = list(tokens(sql, plain="statements"))
    except Unreadable as exc:
        raise ResourceError(f"plans may not run {_unreadable(exc)}") from None
    replace = _named_placeholder if style == "named" else _qmark_placeholder
    return "".join(
        _PLACEHOLDER.sub(replace, sql[start:end])
        if kind in {"plain", "other"}
        else sql[start:end].replace("%", "%%")  # a string, quoted name or comment
        for kind, start, end in found
    )


# In a stretch of tokens: a standard string, quoted name or -- comment (whole,
# as the lexer cut the stretch), a cast, a :name placeholder (a Python
# identifier that is a whole name to PostgreSQL, not the E of an E'...'
# string), ?, or %.
_PLACEHOLDER = re.compile(
    rf"""(?P<quoted>'(?:[^']+|'')*+'|"(?:[^"]+|"")*+"|--[^\n\r]*)
    | ::
    | :(?P<name>(?![eEbBxX]')(?![uU]&['"])[A-Za-z_]\w*(?![{NAME_CHARS}]))
    | \?
    | %""",
    re.VERBOSE,
)


def _named_placeholder(match: re.Match[str]) -> str:
    token = match[0]
    if match["name"] is not None:
        return f"%({match['name']})s"
    return "%%" if token == "%" else token.replace("%", "%%") if match["quoted"] else token


def _qmark_placeholder(match: re.Match[str]) -> str:
    token = match[0]
    if token == "?":
        return "%s"
    return "%%" if token == "%" else token.replace("%", "%%") if match["quoted"] else token


_SETTINGS = "a session setting would outlive the plan on a pooled connection; use SET LOCAL"
_REFUSED_FIRST_WORDS = {
    "BEGIN": OWNS_TRANSACTION,
    "START": OWNS_TRANSACTION,
    "COMMIT": OWNS_TRANSACTION,
    "END": OWNS_TRANSACTION,
    "ROLLBACK": OWNS_TRANSACTION,
    "ABORT": OWNS_TRANSACTION,
    "SAVEPOINT": OWNS_TRANSACTION,
    "RELEASE": OWNS_TRANSACTION,
    "RESET": _SETTINGS,
    "LOAD": "a library loaded into the session would outlive the plan on a pooled connection",
}


def _unreadable(exc: Unreadable) -> str:
    return f"SQL with {exc}: it cannot be read with certainty"


_PREPARING = frozenset({"PREPARE", "DEALLOCATE"})


def _refusal(sql: str, standard_strings: bool = True) -> str | None:
    """Say why a plan may not run *sql*, or ``None`` when it may (see :func:`_read`)."""
    return _read(sql, standard_strings)[0]


@functools.lru_cache(maxsize=1024)
def _read(sql: str, standard_strings: bool = True) -> tuple[str | None, str]:
    """Say why a plan may not run *sql* (or ``None``), and what its first word is.

    The statement is read as PostgreSQL's lexer reads it (*standard_strings*
    is the session's ``standard_conforming_strings``): there must be one
    statement only (as on SQLite), and it must not end the plan's transaction
    or change a session setting that would outlive the plan. SQL that cannot
    be read with certainty is refused.
    """
    try:
        count, words = outline(sql, standard_strings=standard_strings)
    except Unreadable as exc:
        return _unreadable(exc), ""
    first, second = [*words, "", ""][:2]
    if count > 1:
        return "more than one statement at a time: plans run one statement per step or call", first
    if first in _REFUSED_FIRST_WORDS:
        return f"{first}: {_REFUSED_FIRST_WORDS[first]}", first
    if first == "PREPARE" and second == "TRANSACTION":
        return f"PREPARE TRANSACTION: {OWNS_TRANSACTION}", first
    if first == "SET" and second not in ("LOCAL", "TRANSACTION", "CONSTRAINTS"):
        return f"SET without LOCAL: {_SETTINGS}", first
    return None, first
