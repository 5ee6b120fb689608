"""DatabaseResourceHandler under threads: one connection per plan, fair turns, a bounded pool."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import turn_waiters, wait_until
from handler.conftest import Worker as _Worker

from cleveragents.errors import (
    ResourceBusyError,
)
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

MakeHandler = Callable[..., DatabaseResourceHandler]


def _database(path: Path, name: str = "db", **options: Any) -> Resource:
    return Resource(name=name, kind="database", engine="sqlite", location=str(path), **options)


def _second_database(tmp_path: Path, name: str = "other") -> Resource:
    path = tmp_path / f"{name}.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (v TEXT)")
    conn.close()
    return _database(path, name)


# -- one connection per (plan, database) -------------------------------------------


def test_two_resources_naming_one_file_share_the_plans_connection(
    handler: DatabaseResourceHandler, db_path: Path, tmp_path: Path, rows: Any
) -> None:
    first = _database(db_path, "first")
    # The same file through another path spelling is the same database.
    alias = tmp_path / "alias"
    alias.mkdir()
    second = _database(alias / ".." / db_path.name, "second")
    with handler.connection(first, "p1") as one, handler.connection(second, "p1") as two:
        assert one is two
        one.execute("INSERT INTO t VALUES ('x')")
    assert handler.stats().open_connections == 1
    handler.release_plan("p1")
    assert rows(db_path, "SELECT v FROM t") == [("x",)]


# -- a plan's connection across threads ----------------------------------------------------


# -- the pool ---------------------------------------------------------------------


# -- writers take turns ---------------------------------------------------------------


def test_writers_are_admitted_first_come_first_served(
    make_handler: MakeHandler, resource: Resource, db_path: Path, rows: Any
) -> None:
    writers = 6
    handler = make_handler(max_connections=writers + 1, acquire_timeout=30)
    admitted: list[int] = []
    handler.create_checkpoint(resource, "holder", "a")

    def writer(index: int) -> None:
        handler.create_checkpoint(resource, f"w{index}", "a")
        admitted.append(index)
        with handler.connection(resource, f"w{index}") as conn:
            conn.execute("INSERT INTO t VALUES (?)", (f"w{index}",))
        handler.release_plan(f"w{index}")

    workers = []
    for index in range(writers):
        worker = _Worker(lambda i=index: writer(i))
        worker.start()
        workers.append(worker)
        wait_until(lambda n=index + 1: turn_waiters(handler) == n)
    assert admitted == []
    handler.release_plan("holder")
    for worker in workers:
        worker.finish()
    assert admitted == list(range(writers))
    assert sorted(rows(db_path, "SELECT v FROM t")) == [(f"w{i}",) for i in range(writers)]


def test_a_writer_waiting_past_busy_timeout_names_the_holder(
    handler: DatabaseResourceHandler, db_path: Path, rows: Any
) -> None:
    resource = _database(db_path, busy_timeout="200ms")
    handler.create_checkpoint(resource, "holder", "a")
    with pytest.raises(ResourceBusyError) as info:
        handler.create_checkpoint(resource, "late", "before-write")
    error = info.value
    assert error.holder == "holder"
    assert (error.plan_id, error.checkpoint_id, error.resource, error.operation) == (
        "late",
        "before-write",
        "db",
        "create_checkpoint",
    )
    assert "'holder' holds its write turn" in str(error)
    stats = handler.stats()
    assert (stats.active_plans, stats.busy_timeouts) == (1, 1)
    assert stats.open_connections - stats.idle_connections == 1  # only the holder's
    handler.release_plan("holder")
    with handler.connection(resource, "late") as conn:  # its turn now comes at once
        conn.execute("INSERT INTO t VALUES ('late')")
    handler.release_plan("late")
    assert rows(db_path, "SELECT v FROM t") == [("late",)]


def test_a_writer_gives_up_its_place_in_line_on_timeout(
    handler: DatabaseResourceHandler, db_path: Path
) -> None:
    quick = _database(db_path, busy_timeout="100ms")
    patient = _database(db_path, busy_timeout=30)
    handler.create_checkpoint(quick, "holder", "a")
    late = _Worker(lambda: handler.create_checkpoint(patient, "patient", "a"))
    with pytest.raises(ResourceBusyError):
        handler.create_checkpoint(quick, "impatient", "a")
    late.start()
    wait_until(lambda: turn_waiters(handler) == 1)
    handler.release_plan("holder")
    assert late.finish().depth == 1
    assert turn_waiters(handler) == 0


def test_deferred_plans_do_not_wait_for_a_turn(
    handler: DatabaseResourceHandler, db_path: Path
) -> None:
    writer = _database(db_path)
    reader = _database(db_path, lock="deferred")
    handler.create_checkpoint(writer, "writer", "a")
    with handler.connection(writer, "writer") as conn:
        conn.execute("INSERT INTO t VALUES ('uncommitted')")
    with handler.connection(reader, "reader") as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    handler.release_plan("writer")
    handler.release_plan("reader")


# -- evict_lru ------------------------------------------------------------------------
