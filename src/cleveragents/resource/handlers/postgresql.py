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
  and a connection failure is re-raised without the driver's exception chained;
* PostgreSQL has no authorizer: every statement a plan's cursors send is read
  first, as the server's own lexer would (:mod:`._pgsql`), and refused if it
  would end the plan's transaction or change the session for the next plan;
* a lent ``psycopg.Connection`` has ways around any reading (``conn.pgconn``),
  so the engine also notices when the plan's transaction is gone or was
  replaced (:meth:`PostgreSQLEngine.transaction_lost`), checks it once more in
  the very message that commits, and resets a session before it is pooled
  (temporary tables, settings, prepared statements, advisory locks...).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import re
import secrets
import select
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from cleveragents.errors import ResourceError
from cleveragents.resource.handlers._pg_connection import (
    _guarded,
    _plan_connection_class,
    _Session,
    _to_pyformat,
)
from cleveragents.resource.handlers.engine import (
    Engine,
    EngineSettings,
    Outcome,
)

if TYPE_CHECKING:
    from types import ModuleType

logger = logging.getLogger(__name__)

EXTRA = "cleveragents[postgresql]"
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Lock timeout, deadlock, serialization failure: another session was in the way.
_BUSY_STATES = frozenset({"55P03", "40P01", "40001"})
# The server ended the session: an idle-in-transaction, transaction or idle-session
# timeout, terminated, shut down, crashed, starting up, its database dropped.
_LOST_STATES = frozenset({"25P03", "25P04", "57P01", "57P02", "57P03", "57P04", "57P05"})
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


class PostgreSQLSettings(EngineSettings):
    """Per-resource settings of a PostgreSQL database."""

    # Inputs stay out of error messages: one of them is the DSN.
    model_config = ConfigDict(hide_input_in_errors=True)

    engine: Literal["postgresql"] = Field(description="The database engine.")
    dsn: SecretStr = Field(
        description="A libpq connection string (postgresql:// URI or key=value pairs), or "
        "'${NAME}' to read it from environment variable NAME. It is a secret: never shown.",
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


# A transaction-local setting holding a random token the handler sets at BEGIN:
# any transaction begun later on the session lacks it. Read with SHOW, which,
# unlike any SELECT, takes no snapshot: the plan may still SET TRANSACTION
# ISOLATION LEVEL as its first statement.
_TOKEN_SETTING = "cleveragents.transaction"
# Everything a plan can leave on a session, undone as DISCARD ALL would (which
# cannot share a message with COMMIT). RESET ALL brings back the session's
# startup values, which hold the handler's lock_timeout and idle backstop.
# Cursors WITH HOLD and prepared statements only come from DECLARE and PREPARE,
# which the guard sees: they are closed and deallocated only when there are some
# (psycopg's own prepared statements serve the next plans; its cache knows them).
_RESET_SESSION = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; DISCARD TEMP; DISCARD SEQUENCES"
)
_UNLOCK = "pg_catalog.pg_advisory_unlock_all()"
# Before COMMIT, in one statement: the transaction is still the plan's (a
# division by zero if not, and then nothing after it runs); session advisory
# locks go.
_BEFORE_COMMIT = (
    "SELECT 1 OPERATOR(pg_catalog./) (pg_catalog.current_setting('{setting}') "
    "OPERATOR(pg_catalog.=) '{token}')::pg_catalog.int4, " + _UNLOCK
)
# A transaction rolled back takes what it set, made or listened to with it;
# what is left is what is not transactional. Every prepared statement goes,
# psycopg's too, as psycopg does itself when it sees a ROLLBACK: one may have
# been planned against tables the rollback changed.
_AFTER_ROLLBACK = f"SELECT {_UNLOCK}; DEALLOCATE ALL; DISCARD SEQUENCES"
_GONE_BY_PLAN = (
    "SQL the plan ran around cleveragents' guard ended its transaction "
    "(e.g. a COMMIT through conn.pgconn)"
)
_REPLACED_BY_PLAN = (
    "SQL the plan ran around cleveragents' guard ended its transaction and began another"
)
_GONE_BY_SERVER = "the server ended the plan's session"
_STILL_RUNNING = (
    "a statement of the plan was still running on its session (a stream() left unfinished, "
    "or the connection used outside its block)"
)
_PIPELINE_LEFT = "the plan left its session in pipeline mode"
_UNKNOWN_STATE = "the plan's session is in an unknown state"
_UNVERIFIED = "asking the server whether the plan's transaction is still open failed"
_ABORTED = (
    "a statement failed and PostgreSQL aborted the transaction, so the plan was "
    "rolled back; roll back to a checkpoint after a failed statement to go on"
)


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

    def __init__(self) -> None:
        self._pg = pg = _import_psycopg()
        self.driver_error = pg.Error
        self._connection_class = _plan_connection_class(pg)
        self._cursor_class = _guarded(pg.Cursor)
        self._tuple_row = pg.rows.tuple_row
        self._results_of = pg.generators.execute
        self._error_from = pg.errors.error_from_result
        self._connect_error = _connect_error_class(pg)
        status = pg.pq.TransactionStatus
        self._idle, self._in_transaction, self._in_error = (
            status.IDLE,
            status.INTRANS,
            status.INERROR,
        )
        self._active = status.ACTIVE
        self._bad = pg.pq.ConnStatus.BAD
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
        session = conn.plan_session
        session.prepare = (conn.prepare_threshold, conn.prepared_max)
        session.verify_after = settings.checkpoint_ttl or self.default_checkpoint_ttl
        session.last_active = time.monotonic()
        return conn

    def begin(self, conn: Any, settings: PostgreSQLSettings, *, plan_id: str) -> None:
        # One round trip, which also marks the transaction as the plan's: the
        # plan's application_name, which the server reports to the client, and
        # a random token only the handler's transaction holds (see
        # transaction_lost). SET LOCAL ends with the transaction, so an idle
        # session shows only the runtime's name.
        session = conn.plan_session
        session.clean = False
        token = secrets.token_hex(12)
        name = _quote_literal(_application_name(plan_id))
        self._own(
            conn,
            f"BEGIN; SET LOCAL application_name = {name}; SET LOCAL {_TOKEN_SETTING} = '{token}'",
        )
        session.token = token.encode()
        session.marker = conn.pgconn.parameter_status(b"application_name")
        session.lost = None

    def savepoint(self, conn: Any, name: str) -> None:
        self._own(conn, f'SAVEPOINT "{name}"')

    def rollback_to(self, conn: Any, name: str) -> None:
        self._own(conn, f'ROLLBACK TO SAVEPOINT "{name}"')

    def commit(self, conn: Any) -> None:
        # PostgreSQL answers COMMIT of an aborted transaction with a silent
        # ROLLBACK; refuse instead (the handler asks check_committable first).
        if conn.pgconn.transaction_status == self._in_error:
            raise self._pg.errors.InFailedSqlTransaction(
                "the transaction is aborted; COMMIT would only roll it back"
            )
        session = conn.plan_session
        # One message: check and unlock (see _BEFORE_COMMIT), COMMIT (RELEASE of
        # the outermost savepoint does not commit on PostgreSQL), then reset.
        before = _BEFORE_COMMIT.format(
            setting=_TOKEN_SETTING, token=(session.token or b"").decode()
        )
        close = "CLOSE ALL; " if session.declared else ""
        deallocate = "; DEALLOCATE ALL" if session.prepared else ""
        results = self._script(conn, f"{before}; COMMIT; {close}{_RESET_SESSION}{deallocate}")
        failed = self._failure(results, conn)
        if failed is not None and failed[0] == 0:
            if self.classify(failed[1]) != "other":
                raise failed[1]  # the session ended or the check could not run
            session.lost = _REPLACED_BY_PLAN
            raise ResourceError(f"COMMIT was not run: {_REPLACED_BY_PLAN}")
        if failed is not None and failed[0] == 1:
            # COMMIT failed (a deferred constraint, a serialization failure): the
            # server rolled the transaction back; reset the session all the same.
            if conn.pgconn.transaction_status == self._idle:
                self._after_reset(conn, self._failure(self._script(conn, _AFTER_ROLLBACK), conn))
            raise failed[1]
        self._after_reset(conn, failed, deallocated=session.prepared)

    def rollback(self, conn: Any) -> None:
        if conn.closed or conn.pgconn.transaction_status == self._idle:
            return  # nothing open: a lost session was rolled back by the server
        try:
            failed = self._failure(self._script(conn, f"ROLLBACK; {_AFTER_ROLLBACK}"), conn)
            if failed is not None and failed[0] == 0:
                raise failed[1]
        except self._pg.OperationalError:
            if conn.closed:
                return  # the server ended the session, which rolled the transaction back
            raise
        self._after_reset(conn, failed)

    def _after_reset(
        self, conn: Any, failed: tuple[int, Exception] | None, *, deallocated: bool = True
    ) -> None:
        """Note whether the session may be pooled, now that the plan's transaction ended.

        With *deallocated*, DEALLOCATE ALL was sent: psycopg is told its
        prepared statements are gone (were it not, the session is closed anyway).
        """
        session: _Session = conn.plan_session
        if failed is not None:
            logger.info("resetting a session failed, so it is closed: %s", self.redact(failed[1]))
        if deallocated:
            conn._prepared.clear()
            conn._prepared._to_flush.clear()  # nothing left to deallocate on the server
        session.clean = failed is None and session.lost is None
        session.token, session.declared, session.prepared = None, False, False

    def _finish_reset(self, conn: Any) -> None:
        """Reset a session whose plan's transaction ended before its reset ran (Ctrl-C)."""
        try:
            results = self._script(conn, f"{_AFTER_ROLLBACK}; CLOSE ALL; {_RESET_SESSION}")
        except self._pg.Error as exc:
            logger.info("resetting a session failed, so it is closed: %s", self.redact(exc))
            return
        self._after_reset(conn, self._failure(results, conn))

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
        # The engine's own cursor class and row factory: whatever the plan set
        # on the connection in a block has no say in what execute() sends or returns.
        with self._cursor_class(conn, row_factory=self._tuple_row) as cursor:
            cursor.execute(query, values)
            if conn.pgconn.transaction_status == self._idle:
                # A backstop behind _refusal: should any statement still end the
                # plan's transaction, stop the plan before later statements
                # commit one by one.
                conn.plan_session.lost = _GONE_BY_PLAN
                raise ResourceError(
                    f"the plan's SQL ended the plan's transaction ({cursor.statusmessage}); "
                    "plans must not COMMIT or ROLLBACK: cleveragents ends the transaction"
                )
            return cursor.fetchall() if cursor.description is not None else []

    def transaction_lost(self, conn: Any) -> str | None:
        """Say why the plan's transaction on *conn* is gone (or was replaced), from the client.

        Free of round trips unless the application_name the server reports
        changed: then one query tells whether the transaction is still the one
        that began (the plan may set application_name itself) or another one.
        """
        session: _Session = conn.plan_session
        if session.lost is None:
            session.lost = self._gone(conn, session)
        return session.lost

    def _gone(self, conn: Any, session: _Session) -> str | None:
        pgconn = conn.pgconn
        if pgconn.status == self._bad:
            return _GONE_BY_SERVER
        if pgconn.pipeline_status:
            return _PIPELINE_LEFT
        status = pgconn.transaction_status
        if status == self._in_transaction:
            if pgconn.parameter_status(b"application_name") == session.marker:
                return None
            return self._verify(conn, session)
        if status == self._in_error:
            return None  # it can only be rolled back; verified once it is usable again
        if status == self._idle:
            return _GONE_BY_PLAN
        return _STILL_RUNNING if status == self._active else _UNKNOWN_STATE

    def _verify(self, conn: Any, session: _Session) -> str | None:
        """Ask the server whether the plan's transaction is still open on *conn* (a round trip)."""
        try:
            results = self._own(conn, f"SHOW {_TOKEN_SETTING}")
        except self._pg.Error as exc:
            # Dead, or the question failed and so aborted the transaction: no commit either way.
            lost = conn.closed or self.classify(exc) == "lost"
            return _GONE_BY_SERVER if lost else _UNVERIFIED
        if results[0].get_value(0, 0) != session.token:
            return _REPLACED_BY_PLAN
        session.marker = conn.pgconn.parameter_status(b"application_name")
        return None

    def check_committable(self, conn: Any) -> str | None:
        """Say why committing *conn* would lose work; the handler asks before the first COMMIT.

        Beyond :meth:`transaction_lost` and an aborted transaction: the server
        may have ended a session that sat idle while the plan worked elsewhere
        (its idle backstop), and the client learns it only when it next speaks.
        A session idle for ``checkpoint_ttl`` or more, or with something unasked
        waiting on its socket, is asked first, so such a plan commits nowhere.
        """
        reason = self.transaction_lost(conn)
        if reason is not None:
            return reason
        if conn.pgconn.transaction_status == self._in_error:
            return _ABORTED
        session: _Session = conn.plan_session
        idle = time.monotonic() - session.last_active
        if idle >= session.verify_after or _readable(conn.pgconn.socket):
            session.lost = self._verify(conn, session)
        return session.lost

    def in_transaction(self, conn: Any) -> bool:
        return not conn.closed and conn.pgconn.transaction_status != self._idle

    def is_clean(self, conn: Any) -> bool:
        """Whether *conn* may be pooled; puts back what a plan may change on the connection object.

        The session itself was reset by the COMMIT or ROLLBACK message; a
        session that could not be (or whose transaction the plan ended) is not
        clean, so the handler closes it. So "clean" also says whether the
        plan's transaction ended: the handler asks it after a Ctrl-C landed in
        the COMMIT message, and a COMMIT that ran before the reset could is
        followed by the reset, here.
        """
        pgconn = conn.pgconn
        session: _Session = conn.plan_session
        if pgconn.status == self._bad or pgconn.pipeline_status:
            return False
        if pgconn.transaction_status != self._idle:
            return False
        if not session.clean and session.token is not None and session.lost is None:
            self._finish_reset(conn)
        if not session.clean:
            return False
        if conn.handler_statement or not conn.autocommit:
            return False
        # psycopg keeps these on the connection object; a plan may change them
        # in a block, and the next plan must not inherit them.
        conn.row_factory = self._tuple_row
        conn.cursor_factory = self._pg.Cursor
        conn.server_cursor_factory = self._pg.ServerCursor
        conn.prepare_threshold, conn.prepared_max = conn.plan_session.prepare
        conn._adapters = None  # a fresh copy of the global adapters when next asked
        conn._notice_handlers.clear()
        conn._notify_handlers.clear()
        # No notification waits in psycopg's backlog: the reset's UNLISTEN ran
        # before the session went idle, which is when the server delivers them.
        return True

    def close(self, conn: Any) -> None:
        # The plan connection refuses close() and rollback(); close the session the base way.
        self._pg.Connection.close(conn)

    def interrupt(self, conn: Any) -> None:
        """Ask the server to cancel the statement running on *conn* (from any thread)."""
        if conn.closed:
            return
        try:
            conn.cancel_safe(timeout=5.0)
        except (self._pg.Error, OSError) as exc:
            logger.debug("cancelling a statement failed: %s", self.redact(exc))

    # -- the handler's own statements -------------------------------------------

    def _script(self, conn: Any, sql: str) -> list[Any]:
        """Send the handler's *sql* (one or more statements) and return every result.

        Straight to libpq, under the connection's lock: no cursor class, row
        factory or adapter the plan may have set has a say.
        """
        pgconn = conn.pgconn
        # Never wait for psycopg's lock: whoever holds it is outside the plan's
        # lease (a stream() left unfinished holds it until it is dropped).
        if not conn.lock.acquire(blocking=False):
            raise self._pg.errors.ObjectInUse(_STILL_RUNNING)
        try:
            pgconn.send_query(sql.encode())  # raises OperationalError on a closed session
            results: list[Any] = conn.wait(self._results_of(pgconn))
        finally:
            conn.lock.release()
        conn.plan_session.last_active = time.monotonic()
        return results

    def _failure(self, results: list[Any], conn: Any) -> tuple[int, Exception] | None:
        """Return the position and error of the failed statement among *results*, if one failed."""
        fatal = self._pg.pq.ExecStatus.FATAL_ERROR
        for index, result in enumerate(results):
            if result.status == fatal:
                return index, self._error_from(result, encoding=conn.pgconn._encoding)
        return None

    def _own(self, conn: Any, sql: str) -> list[Any]:
        """Run the handler's *sql*, raising the driver's error if a statement failed."""
        results = self._script(conn, sql)
        failed = self._failure(results, conn)
        if failed is not None:
            raise failed[1]
        return results

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


def _readable(socket: int) -> bool:
    """Whether the server sent something unasked: while idle in a transaction, its goodbye."""
    readable, _, _ = select.select([socket], [], [], 0)
    return bool(readable)


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
