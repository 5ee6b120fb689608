"""SQLite specifics: opening connections, pragmas, BEGIN and savepoints."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from cleveragents.durations import Duration
from cleveragents.resource.handlers.engine import Engine, Outcome

MEMORY = ":memory:"
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


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

    def open(self, settings: SQLiteSettings, *, application_name: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            settings.location,
            timeout=settings.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA synchronous = {settings.synchronous}")
            conn.execute(f"PRAGMA foreign_keys = {'ON' if settings.foreign_keys else 'OFF'}")
            if settings.location != MEMORY:
                self._set_journal_mode(conn, settings)
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_journal_mode(self, conn: sqlite3.Connection, settings: SQLiteSettings) -> None:
        key = (os.path.realpath(settings.location), settings.journal_mode)
        if key in self._journal_ready:
            return
        with self._journal_lock:
            if key in self._journal_ready:
                return
            deadline = time.monotonic() + settings.busy_timeout
            while True:
                try:
                    conn.execute(f"PRAGMA journal_mode = {settings.journal_mode}")
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

    def begin(self, conn: sqlite3.Connection, settings: SQLiteSettings, *, plan_id: str) -> None:
        conn.execute("BEGIN IMMEDIATE" if settings.lock == "immediate" else "BEGIN DEFERRED")

    def savepoint(self, conn: sqlite3.Connection, name: str) -> None:
        conn.execute(f'SAVEPOINT "{name}"')

    def rollback_to(self, conn: sqlite3.Connection, name: str) -> None:
        conn.execute(f'ROLLBACK TO "{name}"')

    def commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: sqlite3.Connection) -> None:
        # A failed statement (e.g. an interrupt) can already have ended the
        # transaction; ROLLBACK would then fail with "no transaction is active".
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def execute(
        self,
        conn: sqlite3.Connection,
        sql: str,
        params: Mapping[str, Any] | Sequence[Any] | None,
    ) -> list[tuple[Any, ...]]:
        cursor = conn.execute(sql, params if params is not None else ())
        try:
            return cursor.fetchall()
        finally:
            cursor.close()

    def is_clean(self, conn: sqlite3.Connection) -> bool:
        return not conn.in_transaction

    def close(self, conn: sqlite3.Connection) -> None:
        conn.close()

    def interrupt(self, conn: sqlite3.Connection) -> None:
        conn.interrupt()

    def classify(self, exc: BaseException) -> Outcome:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _BUSY_CODES:
            return "busy"
        if "database is locked" in str(exc):
            return "busy"
        return "other"


__all__ = ["MEMORY", "SQLiteEngine", "SQLiteSettings"]
