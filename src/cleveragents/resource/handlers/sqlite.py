"""SQLite specifics: opening connections, pragmas, BEGIN and savepoints.

The connection lent to a plan, and what keeps the plan inside its transaction
and the next plan free of it, live in ``_sqlite_connection``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from cleveragents.durations import Duration
from cleveragents.errors import ResourceError
from cleveragents.resource.handlers._sqlite_connection import (
    CLOSED,
    GUARD_REFS,
    LOST,
    OWN,
    PlanConnection,
    PlanCursor,
    driver_execute,
    getrefcount,
    refusal,
)
from cleveragents.resource.handlers.engine import Engine, Outcome

logger = logging.getLogger(__name__)

MEMORY = ":memory:"
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
# BEGIN IMMEDIATE on a connection still reading an older snapshot (a statement
# left open on it): it can never succeed there, so the connection is replaced.
_BUSY_SNAPSHOT = 517
# The handler's own statements, tagged (see OWN).
_BEGIN_IMMEDIATE = OWN + "BEGIN IMMEDIATE"
_BEGIN_DEFERRED = OWN + "BEGIN DEFERRED"
_COMMIT = OWN + "COMMIT"
_ROLLBACK = OWN + "ROLLBACK"


class SQLiteSettings(BaseModel):
    """Per-resource settings of an SQLite database."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    busy_timeout: Duration = Field(
        default=5.0,
        description="How long a writer waits for its turn or for another program's lock "
        "(seconds, or '250ms', '5s').",
    )
    foreign_keys: bool = Field(default=True, description="PRAGMA foreign_keys.")
    lock: Literal["immediate", "deferred"] = Field(
        default="immediate",
        description="'immediate' takes the write lock when the plan begins (writers); "
        "'deferred' only when it first writes (readers).",
    )
    checkpoint_ttl: Duration | None = Field(
        default=None,
        gt=0,
        description="Roll the plan back after it sat idle this long "
        "(default: the handler's, 300s).",
    )


class SQLiteEngine(Engine):
    """SQLite through the standard library's sqlite3, in explicit-transaction mode."""

    name: ClassVar[str] = "sqlite"
    settings_model: ClassVar[type[BaseModel]] = SQLiteSettings
    serializes_writers: ClassVar[bool] = True
    driver_error: ClassVar[type[BaseException]] = sqlite3.Error

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
        conn.memory = settings.location == MEMORY
        try:
            conn.own(f"{OWN}PRAGMA synchronous = {settings.synchronous}")
            conn.own(f"{OWN}PRAGMA foreign_keys = {'ON' if settings.foreign_keys else 'OFF'}")
            if settings.location != MEMORY:
                self._set_journal_mode(conn, settings)
        except BaseException:
            sqlite3.Connection.close(conn)
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
                    conn.own(f"{OWN}PRAGMA journal_mode = {settings.journal_mode}")
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
        try:
            conn.own(_BEGIN_IMMEDIATE if settings.lock == "immediate" else _BEGIN_DEFERRED)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) == _BUSY_SNAPSHOT:
                conn.unfit = "a statement left open on it holds an old snapshot"
            raise
        # What lending the connection means, inline: this is on every plan's path.
        conn.lent = True
        conn.lost = False
        conn.generation += 1

    def savepoint(self, conn: PlanConnection, name: str) -> None:
        # In autocommit mode SAVEPOINT would begin a new transaction, which the
        # handler would then take for the plan's and commit. (A driver error, so
        # the handler names the plan, checkpoint and database.)
        if not conn.in_transaction:
            raise sqlite3.OperationalError(LOST)
        conn.own(f'{OWN}SAVEPOINT "{name}"')

    def rollback_to(self, conn: PlanConnection, name: str) -> None:
        if not conn.in_transaction:
            raise sqlite3.OperationalError(LOST)
        conn.own(f'{OWN}ROLLBACK TO "{name}"')

    def commit(self, conn: PlanConnection) -> None:
        if conn._handles:
            conn.close_handles()  # a statement still open would make COMMIT fail as busy
        conn.own(_COMMIT)
        if conn.memory:
            self._reset_memory(conn)

    def rollback(self, conn: PlanConnection) -> None:
        if conn._handles:
            conn.close_handles()
        # A failed statement (e.g. an interrupt) can already have ended the
        # transaction; ROLLBACK would then fail with "no transaction is active".
        if conn.in_transaction:
            conn.own(_ROLLBACK)
        if conn.memory:
            self._reset_memory(conn)

    def _reset_memory(self, conn: PlanConnection) -> None:
        """Put back what a plan left on a ``:memory:`` connection, which the handler keeps.

        The handler never checks such a connection in (its database would go
        with it), so the reset :meth:`is_clean` does happens here.
        """
        if not self.is_clean(conn):
            logger.warning("a plan left something behind on a ':memory:' database it shares")
        if conn._unguarded or not conn._guard_intact():
            conn._expire_statements()  # the guard back, for the plans after this one
            conn._unguarded = False

    def execute(
        self,
        conn: PlanConnection,
        sql: str,
        params: Mapping[str, Any] | Sequence[Any] | None,
    ) -> list[tuple[Any, ...]]:
        trouble = conn.trouble()
        if trouble is not None:
            raise ResourceError(f"{trouble}; nothing more runs on it")
        conn.refused = None
        try:
            cursor = driver_execute(conn, sql, params if params is not None else ())
        except sqlite3.DatabaseError:
            refused = refusal(conn)
            if refused is not None:
                raise refused from None
            raise
        try:
            return cursor.fetchall()
        finally:
            cursor.close()

    def transaction_lost(self, conn: PlanConnection) -> str | None:
        try:
            # The answer on every plan's path, without a call: still inside, still guarded.
            if conn.in_transaction and getrefcount(conn._guard) == GUARD_REFS:
                return None
            return conn.trouble()
        except sqlite3.ProgrammingError:  # closed by sqlite3.Connection.close(conn)
            return CLOSED

    check_committable = transaction_lost

    def is_clean(self, conn: PlanConnection) -> bool:
        try:
            return conn.back_to_pool()
        except sqlite3.Error:  # closed, or a reset failed: it cannot be trusted
            return False

    def close(self, conn: PlanConnection) -> None:
        sqlite3.Connection.close(conn)

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


__all__ = ["LOST", "MEMORY", "PlanConnection", "PlanCursor", "SQLiteEngine", "SQLiteSettings"]
