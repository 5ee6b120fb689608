"""The handler contract suite: each test runs on every engine a test can reach.

A test asks for ``db`` (a :class:`Database`) and gets one SQLite file and, when
``CLEVERAGENTS_TEST_PG_DSN`` names a server, one fresh PostgreSQL schema: the
same assertions hold on both, as psycopg runs one suite over its pool classes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

PG_VARIABLE = "CLEVERAGENTS_TEST_PG_DSN"
PG_SKIP = (
    f"PostgreSQL tests need {PG_VARIABLE}; start a throwaway server with "
    'eval "$(scripts/pg-test-server start)"'
)


class Database:
    """One database of the engine under test, with a separate connection to check it."""

    def __init__(self, engine: str, where: str, connect: Callable[[], Any]) -> None:
        self.engine = engine
        self.where = where  # a file path (SQLite) or a DSN (PostgreSQL)
        self._connect = connect

    def resource(self, name: str = "db", **settings: Any) -> Resource:
        """Return a resource on this database (*settings* are the resource's own keys)."""
        key = "location" if self.engine == "sqlite" else "dsn"
        return Resource(name, "database", engine=self.engine, **{key: self.where}, **settings)

    def connect(self) -> Any:
        """Open a separate connection (autocommit), outside any handler; close it yourself."""
        return self._connect()

    def run(self, sql: str) -> None:
        """Run *sql* outside any handler, committed at once."""
        conn = self._connect()
        try:
            conn.execute(sql)
        finally:
            conn.close()

    def rows(self, sql: str = "SELECT v FROM t ORDER BY v") -> list[Any]:
        """Return the first column of *sql*'s rows, read through a separate connection."""
        conn = self._connect()
        try:
            return [row[0] for row in conn.execute(sql).fetchall()]
        finally:
            conn.close()


def _sqlite(tmp_path: Path, name: str) -> Iterator[Database]:
    path = str(tmp_path / f"{name}.db")

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(path, isolation_level=None, timeout=10)

    database = Database("sqlite", path, connect)
    database.run("CREATE TABLE t (v TEXT)")
    yield database


def _postgresql() -> Iterator[Database]:
    base = os.environ.get(PG_VARIABLE)
    if not base:
        pytest.skip(PG_SKIP)
    psycopg = pytest.importorskip("psycopg")
    schema = f"t_{uuid.uuid4().hex[:12]}"

    def admin() -> Any:
        return psycopg.connect(base, autocommit=True, connect_timeout=10)

    with admin() as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    dsn = psycopg.conninfo.make_conninfo(base, options=f"-c search_path={schema}")
    database = Database(
        "postgresql", dsn, lambda: psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    )
    database.run("CREATE TABLE t (v TEXT)")
    try:
        yield database
    finally:
        with admin() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = current_database() "
                "AND application_name LIKE 'cleveragents%%'"
            )
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> str:
    """Return the engine under test."""
    return str(request.param)


@pytest.fixture
def make_db(engine: str, tmp_path: Path) -> Iterator[Callable[[str], Database]]:
    """Return a factory of fresh databases of the engine under test (closed after the test)."""
    made: list[Iterator[Database]] = []

    def factory(name: str = "db") -> Database:
        maker = _sqlite(tmp_path, name) if engine == "sqlite" else _postgresql()
        made.append(maker)
        return next(maker)

    yield factory
    for maker in reversed(made):
        next(maker, None)


@pytest.fixture
def db(make_db: Callable[[str], Database]) -> Database:
    """Return a fresh database of the engine under test, with a table ``t (v TEXT)``."""
    return make_db("db")


@pytest.fixture
def make_handler(
    make_db: Callable[[str], Database],
    make_handler: Callable[..., DatabaseResourceHandler],
) -> Callable[..., DatabaseResourceHandler]:
    """Return tests/conftest.py's factory, set up after make_db: its handlers close first."""
    return make_handler


@pytest.fixture
def handler(
    make_handler: Callable[..., DatabaseResourceHandler],
) -> DatabaseResourceHandler:
    """Return a handler with small limits, closed after the test (before its databases go)."""
    return make_handler(max_connections=4, acquire_timeout=2.0)


class Worker(threading.Thread):
    """A daemon thread that keeps what its target returned or raised."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._call = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._call()
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float = 20.0) -> Any:
        """Wait for the thread; return what its target returned, or raise what it raised."""
        self.join(timeout)
        assert not self.is_alive(), "worker did not finish"
        if self.error is not None:
            raise self.error
        return self.result
