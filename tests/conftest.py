"""Shared pytest fixtures: a temporary database, handlers that always close, fd counting.

Also the helpers tests import by name: waiting for what another thread does,
and the handler's write-turn queue.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cleveragents.fds import count_fds
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler


def eventually(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll *condition*, which another thread makes true; say whether it held within *timeout*."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll *condition* until it holds; fail the test after *timeout* seconds."""
    if not eventually(condition, timeout):
        pytest.fail(f"condition not met within {timeout}s")


def turn_waiters(handler: DatabaseResourceHandler) -> int:
    """Return how many plans wait for a write turn (the handler counts them nowhere public)."""
    return sum(len(database.turnstile) for database in handler._resolver.databases.values())


def fds_to(path: str | os.PathLike[str]) -> int:
    """Return how many of this process's descriptors point at *path* or its -wal/-shm files."""
    base = os.path.realpath(path)
    names = {base, f"{base}-wal", f"{base}-shm", f"{base}-journal"}
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed between listdir and readlink
        if target in names:
            count += 1
    return count


def query(path: str | os.PathLike[str], sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Run *sql* on a separate, short-lived sqlite3 connection and return its rows."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def make_table(path: str | os.PathLike[str], ddl: str = "CREATE TABLE t (v TEXT)") -> None:
    """Create a table in the database at *path*, outside any handler."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(ddl)
    finally:
        conn.close()


@pytest.fixture
def fd_count() -> Callable[[], int]:
    """Return :func:`cleveragents.fds.count_fds`, to count this process's open descriptors."""
    return count_fds


@pytest.fixture
def file_fds() -> Callable[[str | os.PathLike[str]], int]:
    """Return :func:`fds_to`, to count descriptors open on one database and its -wal/-shm."""
    return fds_to


@pytest.fixture
def rows() -> Callable[..., list[tuple[Any, ...]]]:
    """Return :func:`query`, to read rows through a separate sqlite3 connection."""
    return query


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Return the path of a fresh SQLite database file with a table ``t (v TEXT)``."""
    path = tmp_path / "test.db"
    make_table(path)
    return path


@pytest.fixture
def resource(db_path: Path) -> Resource:
    """Return a database resource on :func:`db_path`."""
    return Resource(name="db", kind="database", engine="sqlite", location=str(db_path))


@pytest.fixture
def make_handler() -> Iterator[Callable[..., DatabaseResourceHandler]]:
    """Return a factory of handlers; every handler it made is closed after the test."""
    made: list[DatabaseResourceHandler] = []

    def factory(**options: Any) -> DatabaseResourceHandler:
        handler = DatabaseResourceHandler(**options)
        made.append(handler)
        return handler

    yield factory
    for handler in made:
        handler.close()


@pytest.fixture
def handler(make_handler: Callable[..., DatabaseResourceHandler]) -> DatabaseResourceHandler:
    """Return a handler with small limits that is closed after the test."""
    return make_handler(max_connections=4, acquire_timeout=2.0)
