"""PostgreSQL specifics (psycopg 3): opening sessions, BEGIN, savepoints, error classes.

psycopg is an optional extra (``cleveragents[postgresql]``). It is imported
when the handler first serves a PostgreSQL resource, so importing the package
and validating plans work without it.

What differs from SQLite, and why the code below looks the way it does:

* a failed statement aborts the whole transaction until ``ROLLBACK TO`` or
  ``ROLLBACK``, and ``COMMIT`` of an aborted transaction silently rolls back,
  so :meth:`PostgreSQLEngine.check_committable` refuses it first;
* PostgreSQL locks rows, not the database: writers are not serialized, and a
  lock wait is bounded by ``lock_timeout`` (the resource's ``busy_timeout``);
* the server ends sessions idle in a transaction for too long
  (``idle_in_transaction_session_timeout``, set above ``checkpoint_ttl`` as a
  backstop to the reaper); a lost session is classified as ``"lost"``;
* the DSN is a secret: it is a ``SecretStr``, driver messages are redacted,
  and a connection failure is re-raised without the driver's exception chained.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import re
import threading
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from cleveragents.durations import Duration
from cleveragents.errors import ResourceError
from cleveragents.resource.handlers.engine import (
    OWNS_TRANSACTION,
    Engine,
    Outcome,
    PlanConnectionMixin,
)

if TYPE_CHECKING:
    from types import ModuleType

logger = logging.getLogger(__name__)

EXTRA = "cleveragents[postgresql]"
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Lock timeout, deadlock, serialization failure: another session was in the way.
_BUSY_STATES = frozenset({"55P03", "40P01", "40001"})
# The server ended the session: idle-in-transaction timeout, terminated, shut down.
_LOST_STATES = frozenset({"25P03", "57P01", "57P02", "57P03"})
_UNPARSABLE = (
    "the dsn does not parse as a libpq connection string (a postgresql:// URI or "
    "key=value pairs); check its syntax and quoting"
)
# PostgreSQL keeps at most 63 bytes of a name (NAMEDATALEN - 1).
_MAX_NAME = 63
_CONNECT_TIMEOUT = 10
_MAX_REMEMBERED_DSNS = 256
# The server-side backstop fires this long after checkpoint_ttl at the earliest,
# so the reaper (which rolls back at checkpoint_ttl) always acts first.
_BACKSTOP_FACTOR = 1.25
_BACKSTOP_MARGIN = 5.0
_REDACTIONS = (
    # key=value form: password=secret or password='sec ret'
    (re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'\"]+)", re.IGNORECASE), r"\1***"),
    # URI form: postgresql://user:secret@host
    (re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE), r"\1***@"),
    # URI form: ?password=secret
    (re.compile(r"([?&]password=)[^&\s]*", re.IGNORECASE), r"\1***"),
)


def _resolve_dsn(raw: str) -> str:
    """Return the DSN *raw* stands for: itself, or the variable it names as ``${NAME}``.

    :raises ValueError: the variable is unset or empty.
    """
    match = _ENV_REFERENCE.fullmatch(raw.strip())
    if match is None:
        return raw
    value = os.environ.get(match[1], "")
    if not value.strip():
        raise ValueError(
            f"environment variable {match[1]!r} is not set (dsn: '${{{match[1]}}}' reads it)"
        )
    return value


def _import_psycopg() -> ModuleType:
    """Import psycopg 3, or say which extra to install.

    :raises ResourceError: psycopg 3 is not installed.
    """
    try:
        import psycopg
    except ImportError:
        raise ResourceError(
            f"engine 'postgresql' needs psycopg 3, which is not installed: pip install '{EXTRA}'"
        ) from None
    return psycopg


def _parses(dsn: str) -> bool:
    """Whether libpq can parse *dsn* (``True`` when psycopg is not installed to tell)."""
    try:
        psycopg = _import_psycopg()
    except ResourceError:
        return True  # checked again, with psycopg, when a connection is opened
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return False
    return True


class PostgreSQLSettings(BaseModel):
    """Per-resource settings of a PostgreSQL database."""

    # Inputs stay out of error messages: one of them is the DSN.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    engine: Literal["postgresql"] = Field(description="The database engine.")
    dsn: SecretStr = Field(
        description="A libpq connection string (postgresql:// URI or key=value pairs), or "
        "'${NAME}' to read it from environment variable NAME. It is a secret: never shown.",
    )
    busy_timeout: Duration = Field(
        default=5.0,
        description="How long a statement waits for a lock held by another session "
        "(lock_timeout; seconds, or '250ms', '5s').",
    )
    checkpoint_ttl: Duration | None = Field(
        default=None,
        gt=0,
        description="Roll the plan back after it sat idle this long "
        "(default: the handler's, 300s).",
    )

    @field_validator("dsn")
    @classmethod
    def _check_dsn(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if not raw.strip():
            raise ValueError("the dsn is empty")
        if not _parses(_resolve_dsn(raw)):
            raise ValueError(_UNPARSABLE)
        return value

    def resolved_dsn(self) -> str:
        """Return the DSN, reading the environment variable now if it names one.

        :raises ResourceError: the variable it names is unset or empty.
        """
        try:
            return _resolve_dsn(self.dsn.get_secret_value())
        except ValueError as exc:
            raise ResourceError(str(exc)) from None


class _DriverMissing(Exception):
    """Stands in for ``psycopg.Error`` until psycopg is imported; never raised."""


@functools.cache
def _plan_connection_class(psycopg: ModuleType) -> type[Any]:
    """Return the ``psycopg.Connection`` subclass the handler lends to plans.

    It refuses ``commit()``, ``rollback()`` and ``with conn:`` (which would
    commit, or close the session), and its cursors refuse statements that
    would end the plan's transaction or change session settings (see
    :func:`_refusal`): the handler owns the plan's transaction and ends it
    when the plan ends.
    """

    def check(cursor: Any, query: Any) -> None:
        if cursor.connection.handler_statement:
            return
        if isinstance(query, bytes):
            query = query.decode(errors="replace")
        elif not isinstance(query, str):
            query = query.as_string(cursor.connection)  # a psycopg.sql composition
        refusal = _refusal(query)
        if refusal is not None:
            raise ResourceError(f"plans may not run {refusal}")

    class PlanCursor(psycopg.Cursor):  # type: ignore[misc,name-defined]
        """A cursor of a plan's session; it reads each statement before sending it."""

        def execute(self, query: Any, params: Any = None, **options: Any) -> Any:
            check(self, query)
            return super().execute(query, params, **options)

        def executemany(self, query: Any, params_seq: Any, **options: Any) -> None:
            check(self, query)
            super().executemany(query, params_seq, **options)

    class PlanConnection(PlanConnectionMixin, psycopg.Connection):  # type: ignore[misc,name-defined]
        """A plan's session: a ``psycopg.Connection`` whose transaction the handler owns."""

        @classmethod
        def connect(cls, *args: Any, **kwargs: Any) -> Any:
            return super().connect(*args, cursor_factory=PlanCursor, **kwargs)

    PlanCursor.__qualname__ = PlanCursor.__name__
    PlanConnection.__qualname__ = PlanConnection.__name__
    return PlanConnection


@functools.lru_cache(maxsize=512)
def _to_pyformat(sql: str, style: Literal["named", "qmark"]) -> str:
    """Rewrite ``:name`` (or ``?``) placeholders as psycopg's, and double literal ``%``.

    Quoted strings, quoted identifiers, dollar-quoted bodies and comments are
    left alone, and so is the ``::`` cast.
    """

    def replace(match: re.Match[str]) -> str:
        token = match[0]
        if token == "%":
            return "%%"
        if token == "?":
            return "%s" if style == "qmark" else token
        if match["name"] is not None:
            return f"%({match['name']})s" if style == "named" else token
        return token.replace("%", "%%")

    return _SQL_TOKENS.sub(replace, sql)


_SQL_TOKENS = re.compile(
    r"""
      (?<![\w$])[eE]'(?:[^'\\]|\\.|'')*'        # E'...' with backslash escapes
    | '(?:[^']|'')*'                            # '...'
    | "(?:[^"]|"")*"                            # "quoted identifier"
    | --[^\n]*                                  # line comment
    | /\*.*?\*/                                 # block comment
    | (?<![\w$])\$(?P<tag>(?:[A-Za-z_]\w*)?)\$.*?\$(?P=tag)\$   # $tag$ ... $tag$
    | ::                                        # a cast, not a parameter
    | :(?P<name>[A-Za-z_]\w*)                   # :name
    | \?
    | %
    """,
    re.VERBOSE | re.DOTALL,
)


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
}


def _blank_quoted(match: re.Match[str]) -> str:
    """Replace a quoted string, quoted name or comment by a space; keep other tokens."""
    token = match[0]
    quoted = len(token) > 1 and token[0] in "'\"-/$eE"
    return " " if quoted else token


@functools.lru_cache(maxsize=512)
def _refusal(sql: str) -> str | None:
    """Say why a plan may not run *sql*, or ``None`` when it may.

    PostgreSQL has no authorizer, so the statement is read here: comments and
    quoted text are set aside, there must be one statement only (as on
    SQLite), and it must not end the plan's transaction or change a session
    setting that would outlive the plan.
    """
    outline = _SQL_TOKENS.sub(_blank_quoted, sql)
    statements = [part for part in outline.split(";") if part.strip()]
    if len(statements) > 1:
        return "more than one statement at a time: plans run one statement per step or call"
    words = statements[0].replace("(", " ").upper().split()[:2] if statements else []
    if not words:
        return None
    first, second = words[0], words[1] if len(words) > 1 else ""
    if first in _REFUSED_FIRST_WORDS:
        return f"{first}: {_REFUSED_FIRST_WORDS[first]}"
    if first == "PREPARE" and second == "TRANSACTION":
        return f"PREPARE TRANSACTION: {OWNS_TRANSACTION}"
    if first == "SET" and second not in ("LOCAL", "TRANSACTION", "CONSTRAINTS"):
        return f"SET without LOCAL: {_SETTINGS}"
    return None


def _quote_literal(text: str) -> str:
    """Return *text* as an ``E'...'`` literal, whatever ``standard_conforming_strings`` is."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _application_name(plan_id: str | None = None) -> str:
    """Return the session name: the runtime (``cleveragents[PID]``), then the plan if any."""
    name = f"cleveragents[{os.getpid()}]" + (f":{plan_id}" if plan_id else "")
    # The server keeps printable ASCII only, 63 bytes at most.
    if not (name.isascii() and name.isprintable()):
        name = "".join(c if " " <= c <= "~" else "?" for c in name)
    return name[:_MAX_NAME]


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class PostgreSQLEngine(Engine):
    """PostgreSQL through psycopg 3, in autocommit mode with explicit transactions."""

    name: ClassVar[str] = "postgresql"
    settings_model: ClassVar[type[BaseModel]] = PostgreSQLSettings
    serializes_writers: ClassVar[bool] = False
    driver_error: ClassVar[type[BaseException]] = _DriverMissing

    def __init__(self) -> None:
        self._pg = _import_psycopg()
        PostgreSQLEngine.driver_error = self._pg.Error
        self._connection_class = _plan_connection_class(self._pg)
        self._connect_error = _connect_error_class(self._pg)
        self._idle = self._pg.pq.TransactionStatus.IDLE
        self._in_error = self._pg.pq.TransactionStatus.INERROR
        self._secrets_lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()
        self._secrets_by_dsn: collections.OrderedDict[str, set[str]] = collections.OrderedDict()

    # -- identity and configuration -------------------------------------------

    def identity(self, settings: PostgreSQLSettings, resource_name: str) -> Hashable:
        dsn = settings.resolved_dsn()
        return ("postgresql", hashlib.blake2b(dsn.encode(), digest_size=16).hexdigest())

    def describe(self, settings: PostgreSQLSettings) -> str:
        """Return ``postgresql://HOST:PORT/DBNAME``: no user, no password, no options."""
        try:
            params = self._pg.conninfo.conninfo_to_dict(settings.resolved_dsn())
        except (self._pg.Error, ResourceError):
            return "postgresql"
        host = params.get("host") or params.get("hostaddr") or "localhost"
        port = f":{params['port']}" if params.get("port") else ""
        dbname = params.get("dbname") or params.get("user") or ""
        return f"postgresql://{host}{port}/{dbname}"

    def connection_config(self, settings: PostgreSQLSettings) -> Hashable:
        return (settings.busy_timeout, self._backstop(settings))

    def _backstop(self, settings: PostgreSQLSettings) -> float:
        """Return the server's idle-in-transaction timeout: above the plan's checkpoint_ttl."""
        ttl = settings.checkpoint_ttl or self.default_checkpoint_ttl
        return ttl * _BACKSTOP_FACTOR + _BACKSTOP_MARGIN

    # -- sessions ---------------------------------------------------------------

    def open(self, settings: PostgreSQLSettings, *, application_name: str) -> Any:
        """Open a session; its settings ride in the startup packet (no extra round trip).

        *application_name* (the handler's) is replaced by this runtime's name;
        :meth:`begin` adds the plan's while its transaction runs.
        """
        dsn = settings.resolved_dsn()
        self._remember_secrets(dsn)
        pg = self._pg
        try:
            params = pg.conninfo.conninfo_to_dict(dsn)
        except pg.Error:
            params = None
        if params is None:
            # Raised outside the except block: libpq quotes the DSN in its message.
            raise self._connect_error(_UNPARSABLE)
        options = params.get("options") or os.environ.get("PGOPTIONS", "")
        options += (
            f" -c lock_timeout={_milliseconds(settings.busy_timeout)}"
            f" -c idle_in_transaction_session_timeout={_milliseconds(self._backstop(settings))}"
        )
        connect_timeout = (
            params.get("connect_timeout") or os.environ.get("PGCONNECT_TIMEOUT") or _CONNECT_TIMEOUT
        )
        failure: str | None = None
        try:
            conn = self._connection_class.connect(
                dsn,
                autocommit=True,
                application_name=_application_name(),
                options=options.strip(),
                connect_timeout=connect_timeout,
            )
        except pg.Error as exc:
            failure = self.redact(exc)
        if failure is not None:
            raise self._connect_error(f"cannot connect: {failure}")
        return conn

    def begin(self, conn: Any, settings: PostgreSQLSettings, *, plan_id: str) -> None:
        # One round trip; SET LOCAL ends with the transaction, so an idle
        # session shows only the runtime's name again.
        name = _quote_literal(_application_name(plan_id))
        conn.own(f"BEGIN; SET LOCAL application_name = {name}")

    def savepoint(self, conn: Any, name: str) -> None:
        conn.own(f'SAVEPOINT "{name}"')

    def rollback_to(self, conn: Any, name: str) -> None:
        conn.own(f'ROLLBACK TO SAVEPOINT "{name}"')

    def commit(self, conn: Any) -> None:
        # PostgreSQL answers COMMIT of an aborted transaction with a silent
        # ROLLBACK; refuse instead (the handler asks check_committable first).
        if conn.pgconn.transaction_status == self._in_error:
            raise self._pg.errors.InFailedSqlTransaction(
                "the transaction is aborted; COMMIT would only roll it back"
            )
        # RELEASE of the outermost savepoint does not commit on PostgreSQL; COMMIT does.
        conn.own("COMMIT")

    def rollback(self, conn: Any) -> None:
        if conn.closed or conn.pgconn.transaction_status == self._idle:
            return  # nothing open: a lost session was rolled back by the server
        try:
            conn.own("ROLLBACK")
        except self._pg.OperationalError:
            if not conn.closed:
                raise

    def execute(
        self, conn: Any, sql: str, params: Mapping[str, Any] | Sequence[Any] | None
    ) -> list[tuple[Any, ...]]:
        """Run one statement; a mapping binds ``:name``, a sequence binds ``?``."""
        values: Mapping[str, Any] | Sequence[Any] | None
        if not params:
            query, values = sql, None
        elif type(params) is dict or isinstance(params, Mapping):
            query, values = _to_pyformat(sql, "named"), params
        else:
            query, values = _to_pyformat(sql, "qmark"), params
        with conn.cursor() as cursor:
            cursor.execute(query, values)
            if conn.pgconn.transaction_status == self._idle:
                # A backstop behind _refusal: should any statement still end the
                # plan's transaction, stop the plan before later statements
                # commit one by one.
                raise ResourceError(
                    f"the plan's SQL ended the plan's transaction ({cursor.statusmessage}); "
                    "plans must not COMMIT or ROLLBACK: cleveragents ends the transaction"
                )
            return cursor.fetchall() if cursor.description is not None else []

    def is_clean(self, conn: Any) -> bool:
        return (not conn.closed) and conn.pgconn.transaction_status == self._idle

    def check_committable(self, conn: Any) -> str | None:
        if conn.closed:
            return None  # COMMIT raises, and the error says the session was lost
        if conn.pgconn.transaction_status == self._in_error:
            return (
                "a statement failed and PostgreSQL aborted the transaction, so the plan was "
                "rolled back; roll back to a checkpoint after a failed statement to go on"
            )
        return None

    def close(self, conn: Any) -> None:
        # The plan connection refuses rollback(); close the session the base way.
        self._pg.Connection.close(conn)

    def interrupt(self, conn: Any) -> None:
        """Ask the server to cancel the statement running on *conn* (from any thread)."""
        if conn.closed:
            return
        try:
            conn.cancel_safe(timeout=5.0)
        except (self._pg.Error, OSError) as exc:
            logger.debug("cancelling a statement failed: %s", self.redact(exc))

    # -- errors -----------------------------------------------------------------

    def classify(self, exc: BaseException) -> Outcome:
        pg = self._pg
        if isinstance(exc, self._connect_error) or not isinstance(exc, pg.Error):
            return "other"
        state = exc.sqlstate
        if state in _BUSY_STATES:
            return "busy"
        if state in _LOST_STATES or (state or "").startswith("08"):
            return "lost"
        if state is None and isinstance(exc, pg.OperationalError):
            return "lost"  # the client saw the connection close
        return "other"

    def redact(self, exc: BaseException) -> str:
        """Return the driver's message without any DSN or password this engine has seen."""
        text = str(exc).strip()
        for secret in self._secrets:
            text = text.replace(secret, "***")
        for pattern, replacement in _REDACTIONS:
            text = pattern.sub(replacement, text)
        return text

    def _remember_secrets(self, dsn: str) -> None:
        """Note *dsn* and its password so that :meth:`redact` removes them from messages."""
        found = {dsn}
        try:
            password = self._pg.conninfo.conninfo_to_dict(dsn).get("password")
        except self._pg.Error:
            password = None
        if password:
            found.add(password)
        with self._secrets_lock:
            if dsn in self._secrets_by_dsn:
                self._secrets_by_dsn.move_to_end(dsn)
                return
            self._secrets_by_dsn[dsn] = found
            # Bounded: a process that meets endless DSNs keeps the latest ones (a
            # DSN is used right after it is noted: connection errors quote it then).
            while len(self._secrets_by_dsn) > _MAX_REMEMBERED_DSNS:
                self._secrets_by_dsn.popitem(last=False)
            everything = set().union(*self._secrets_by_dsn.values())
            # Longest first, so a DSN is removed whole before its password is.
            self._secrets = tuple(sorted(everything, key=len, reverse=True))


@functools.cache
def _connect_error_class(psycopg: ModuleType) -> type[Any]:
    """Return the driver error raised for a session that could not be opened.

    It is told apart from a session lost later, and carries a redacted message.
    """

    class ConnectError(psycopg.OperationalError):  # type: ignore[misc,name-defined]
        """A session could not be opened (its message is already redacted)."""

    ConnectError.__qualname__ = ConnectError.__name__
    return ConnectError


__all__ = ["EXTRA", "PostgreSQLEngine", "PostgreSQLSettings"]
