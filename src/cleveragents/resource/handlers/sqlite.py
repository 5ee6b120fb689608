"""SQLite specifics: opening connections, pragmas, BEGIN and savepoints."""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from cleveragents.errors import ResourceError
from cleveragents.resource.handlers.engine import (
    OWNS_TRANSACTION,
    Engine,
    EngineSettings,
    Outcome,
    PlanConnectionMixin,
)

MEMORY = ":memory:"
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})

# The handler's own statements carry this per-process tag. sqlite3 caches
# prepared statements by their text, and SQLite consults the authorizer only
# when a statement is prepared: without the tag, a plan's "COMMIT" could reuse
# the handler's cached, already-authorized one.
_OWN = f"/* cleveragents {secrets.token_hex(8)} */ "
_BEGIN_IMMEDIATE = _OWN + "BEGIN IMMEDIATE"
_BEGIN_DEFERRED = _OWN + "BEGIN DEFERRED"
_COMMIT = _OWN + "COMMIT"
_ROLLBACK = _OWN + "ROLLBACK"
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
# Setting these would outlive the plan on a pooled connection, or undo the
# resource's settings; reading them is fine.
_CONNECTION_PRAGMAS = frozenset(
    {
        "busy_timeout",
        "cache_size",
        "foreign_keys",
        "journal_mode",
        "locking_mode",
        "mmap_size",
        "query_only",
        "recursive_triggers",
        "synchronous",
        "temp_store",
        "trusted_schema",
        "writable_schema",
    }
)


class SQLiteSettings(EngineSettings):
    """Per-resource settings of an SQLite database."""

    engine: Literal["sqlite"] = Field(default="sqlite", description="The database engine.")
    location: str = Field(
        min_length=1,
        description="Database file, relative to the plan file's folder, or ':memory:'.",
    )
    journal_mode: Literal["wal", "delete", "truncate", "persist"] = Field(
        default="wal", description="SQLite journal mode, set once per database file."
    )
    synchronous: Literal["off", "normal", "full", "extra"] = Field(
        default="full", description="PRAGMA synchronous of every connection."
    )
    foreign_keys: bool = Field(default=True, description="PRAGMA foreign_keys.")
    lock: Literal["immediate", "deferred"] = Field(
        default="immediate",
        description="'immediate' takes the write lock when the plan begins (writers); "
        "'deferred' only when it first writes (readers).",
    )


class PlanConnection(PlanConnectionMixin, sqlite3.Connection):
    """A plan's connection: an ``sqlite3.Connection`` whose transaction the handler owns.

    An authorizer refuses, in any statement the plan runs, what would end the
    plan's transaction (``COMMIT``, ``ROLLBACK``, ``RELEASE``...), attach other
    files, or change connection settings that would outlive the plan;
    ``commit()``, ``rollback()`` and ``with conn:`` are refused too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused: tuple[str, str] | None = None  # what the authorizer last refused, why
        self.set_authorizer(self._authorize)

    def _authorize(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None
    ) -> int:
        if self.handler_statement:
            return sqlite3.SQLITE_OK
        refused = _REFUSED.get(action)
        setting = action == sqlite3.SQLITE_PRAGMA and arg2 is not None
        if refused is None and setting and (arg1 or "").lower() in _CONNECTION_PRAGMAS:
            refused = (f"PRAGMA {arg1} = ...", _SETTINGS)
        if refused is None:
            return sqlite3.SQLITE_OK
        self.refused = refused
        return sqlite3.SQLITE_DENY


def _refusal(conn: PlanConnection) -> ResourceError | None:
    """Turn the authorizer's last refusal into the error a plan author can act on."""
    refused, conn.refused = conn.refused, None
    if refused is None:
        return None
    what, why = refused
    return ResourceError(f"plans may not run {what}: {why}")


class SQLiteEngine(Engine):
    """SQLite through the standard library's sqlite3, in explicit-transaction mode."""

    name: ClassVar[str] = "sqlite"
    settings_model: ClassVar[type[BaseModel]] = SQLiteSettings
    serializes_writers: ClassVar[bool] = True
    driver_error: type[BaseException] = sqlite3.Error

    def __init__(self) -> None:
        # Switching a fresh file to WAL from two connections at once fails with
        # "database is locked" whatever the busy timeout, so do it once per file.
        self._journal_lock = threading.Lock()
        self._journal_ready: set[tuple[str, str]] = set()

    def identity(self, settings: SQLiteSettings, resource_name: str) -> Hashable:
        if settings.location == MEMORY:
            return ("sqlite-memory", resource_name)
        return ("sqlite", os.path.realpath(settings.location))

    def describe(self, settings: SQLiteSettings) -> str:
        return settings.location

    def connection_config(self, settings: SQLiteSettings) -> Hashable:
        return (settings.synchronous, settings.busy_timeout, settings.foreign_keys)

    def is_memory(self, settings: SQLiteSettings) -> bool:
        return settings.location == MEMORY

    def takes_turns(self, settings: SQLiteSettings) -> bool:
        return settings.lock == "immediate" or settings.location == MEMORY

    def open(self, settings: SQLiteSettings, *, application_name: str) -> PlanConnection:
        conn = sqlite3.connect(
            settings.location,
            timeout=settings.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            factory=PlanConnection,
        )
        try:
            conn.own(f"{_OWN}PRAGMA synchronous = {settings.synchronous}")
            conn.own(f"{_OWN}PRAGMA foreign_keys = {'ON' if settings.foreign_keys else 'OFF'}")
            if settings.location != MEMORY:
                self._set_journal_mode(conn, settings)
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_journal_mode(self, conn: PlanConnection, settings: SQLiteSettings) -> None:
        key = (os.path.realpath(settings.location), settings.journal_mode)
        if key in self._journal_ready:
            return
        with self._journal_lock:
            if key in self._journal_ready:
                return
            deadline = time.monotonic() + settings.busy_timeout
            while True:
                try:
                    conn.own(f"{_OWN}PRAGMA journal_mode = {settings.journal_mode}")
                    break
                except sqlite3.OperationalError as exc:
                    # Another program holds the lock: SQLite's busy handler does not
                    # apply to this pragma, so wait here, within busy_timeout.
                    if self.classify(exc) != "busy" or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.01)
            if len(self._journal_ready) >= 4096:
                self._journal_ready.clear()  # setting it again is harmless; growing is not
            self._journal_ready.add(key)

    def begin(self, conn: PlanConnection, settings: SQLiteSettings, *, plan_id: str) -> None:
        conn.own(_BEGIN_IMMEDIATE if settings.lock == "immediate" else _BEGIN_DEFERRED)

    def savepoint(self, conn: PlanConnection, name: str) -> None:
        conn.own(f'{_OWN}SAVEPOINT "{name}"')

    def rollback_to(self, conn: PlanConnection, name: str) -> None:
        conn.own(f'{_OWN}ROLLBACK TO "{name}"')

    def commit(self, conn: PlanConnection) -> None:
        conn.own(_COMMIT)

    def rollback(self, conn: PlanConnection) -> None:
        # A failed statement (e.g. an interrupt) can already have ended the
        # transaction; ROLLBACK would then fail with "no transaction is active".
        if conn.in_transaction:
            conn.own(_ROLLBACK)

    def execute(
        self,
        conn: PlanConnection,
        sql: str,
        params: Mapping[str, Any] | Sequence[Any] | None,
    ) -> list[tuple[Any, ...]]:
        conn.refused = None
        try:
            cursor = conn.execute(sql, params if params is not None else ())
        except sqlite3.DatabaseError:
            refusal = _refusal(conn)
            if refusal is not None:
                raise refusal from None
            raise
        try:
            return cursor.fetchall()
        finally:
            cursor.close()

    def is_clean(self, conn: PlanConnection) -> bool:
        return not conn.in_transaction

    def transaction_lost(self, conn: PlanConnection) -> str | None:
        if conn.in_transaction:
            return None
        return "a statement of the plan ended its transaction (e.g. OR ROLLBACK, RAISE(ROLLBACK))"

    def close(self, conn: PlanConnection) -> None:
        conn.close()

    def interrupt(self, conn: PlanConnection) -> None:
        # Closed meanwhile (its plan ended): nothing runs there to interrupt.
        with contextlib.suppress(sqlite3.ProgrammingError):
            conn.interrupt()

    def classify(self, exc: BaseException) -> Outcome:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _BUSY_CODES:
            return "busy"
        if "database is locked" in str(exc):
            return "busy"
        return "other"


__all__ = ["MEMORY", "PlanConnection", "SQLiteEngine", "SQLiteSettings"]
