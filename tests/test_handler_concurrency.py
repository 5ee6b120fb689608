"""DatabaseResourceHandler under threads: one connection per plan, fair turns, a bounded pool."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cleveragents.errors import (
    CheckpointEvictedError,
    PoolExhaustedError,
    ResourceBusyError,
)
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.resource.handlers.sqlite import SQLiteEngine

MakeHandler = Callable[..., DatabaseResourceHandler]


def _database(path: Path, name: str = "db", **options: Any) -> Resource:
    return Resource(name=name, kind="database", engine="sqlite", location=str(path), **options)


def _second_database(tmp_path: Path, name: str = "other") -> Resource:
    path = tmp_path / f"{name}.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (v TEXT)")
    conn.close()
    return _database(path, name)


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for *condition*; fail the test if it does not hold within *timeout*."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.005)


def _queued(handler: DatabaseResourceHandler) -> int:
    """Return how many plans wait for a write turn (the handler's own queue)."""
    return sum(len(db.turnstile) for db in handler._resolver.databases.values())


class _Worker(threading.Thread):
    """A thread that keeps what its target returned or raised."""

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
        self.join(timeout)
        assert not self.is_alive(), "worker did not finish"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def slow_open(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make opening a connection slow and count the opens."""
    opened: list[str] = []
    real_open = SQLiteEngine.open

    def open_slowly(self: SQLiteEngine, settings: Any, **kwargs: Any) -> Any:
        opened.append(settings.location)
        time.sleep(0.2)
        return real_open(self, settings, **kwargs)

    monkeypatch.setattr(SQLiteEngine, "open", open_slowly)
    return opened


# -- one connection per (plan, database) -------------------------------------------


def test_simultaneous_first_calls_of_a_plan_share_one_connection(
    handler: DatabaseResourceHandler,
    resource: Resource,
    db_path: Path,
    slow_open: list[str],
    rows: Any,
) -> None:
    start = threading.Barrier(4)

    def first_call(index: int) -> Any:
        start.wait()
        if index % 2:
            return handler.create_checkpoint(resource, "p1", f"cp{index}").depth
        with handler.connection(resource, "p1") as conn:
            conn.execute("INSERT INTO t VALUES (?)", (f"row {index}",))
            return id(conn)

    workers = [_Worker(lambda i=i: first_call(i)) for i in range(4)]
    for worker in workers:
        worker.start()
    results = [worker.finish() for worker in workers]
    assert len(slow_open) == 1
    assert sorted(results[1::2]) == [1, 2]
    assert results[0] == results[2]
    stats = handler.stats()
    assert (stats.open_connections, stats.active_plans, stats.checkpoints) == (1, 1, 2)
    assert stats.busy_timeouts == 0
    handler.release_plan("p1")
    assert sorted(rows(db_path, "SELECT v FROM t")) == [("row 0",), ("row 2",)]


def test_one_connection_per_plan_per_database(
    handler: DatabaseResourceHandler, resource: Resource, tmp_path: Path
) -> None:
    other = _second_database(tmp_path)
    handler.create_checkpoint(resource, "p1", "a")
    handler.create_checkpoint(resource, "p1", "b")
    handler.create_checkpoint(other, "p1", "a")
    with handler.connection(resource, "p1") as first, handler.connection(resource, "p1") as again:
        assert first is again
    with handler.connection(other, "p1") as second:
        assert second is not first
    assert handler.stats().open_connections == 2
    assert handler.stats().checkpoints == 3
    handler.rollback_plan("p1")


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


def test_any_thread_may_use_a_plans_connection_one_at_a_time(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Any
) -> None:
    log: list[str] = []
    inside = threading.Event()
    second_trying = threading.Event()

    def first() -> int:
        with handler.connection(resource, "p1") as conn:
            log.append("first in")
            inside.set()
            assert second_trying.wait(10)
            time.sleep(0.2)  # give the second thread time to (wrongly) get in
            conn.execute("INSERT INTO t VALUES ('first')")
            log.append("first out")
            return id(conn)

    def second() -> int:
        assert inside.wait(10)
        second_trying.set()
        with handler.connection(resource, "p1") as conn:
            log.append("second in")
            conn.execute("INSERT INTO t VALUES ('second')")
            return id(conn)

    workers = [_Worker(first), _Worker(second)]
    for worker in workers:
        worker.start()
    first_conn, second_conn = (worker.finish() for worker in workers)
    assert log == ["first in", "first out", "second in"]
    assert first_conn == second_conn
    handler.release_plan("p1")  # from a third thread: the plan owns it, not a thread
    assert sorted(rows(db_path, "SELECT v FROM t")) == [("first",), ("second",)]


# -- the pool ---------------------------------------------------------------------


def test_a_freed_slot_goes_to_the_waiting_plan_at_once(
    make_handler: MakeHandler,
    resource: Resource,
    tmp_path: Path,
    db_path: Path,
    rows: Any,
    file_fds: Callable[..., int],
) -> None:
    handler = make_handler(max_connections=1, acquire_timeout=60)
    other = _second_database(tmp_path)
    handler.create_checkpoint(resource, "p1", "a")

    def waiting_plan() -> None:
        with handler.connection(other, "p2") as conn:
            conn.execute("INSERT INTO t VALUES ('p2')")
        handler.release_plan("p2")

    worker = _Worker(waiting_plan)
    worker.start()
    _wait_until(lambda: handler.stats().waits == 1)
    assert worker.is_alive()
    handler.release_plan("p1")
    # Far less than acquire_timeout: the release wakes the waiter.
    worker.finish(timeout=10)
    assert rows(tmp_path / "other.db", "SELECT v FROM t") == [("p2",)]
    assert file_fds(db_path) == 0  # p1's idle connection was closed to make room
    stats = handler.stats()
    assert (stats.open_connections, stats.wait_timeouts) == (1, 0)


def test_an_exhausted_pool_names_the_plans_holding_it(
    make_handler: MakeHandler, resource: Resource, tmp_path: Path
) -> None:
    handler = make_handler(max_connections=2, acquire_timeout="200ms")
    other = _second_database(tmp_path)
    third = _second_database(tmp_path, "third")
    handler.create_checkpoint(resource, "p1", "a")
    handler.create_checkpoint(other, "p2", "a")
    with pytest.raises(PoolExhaustedError) as info:
        handler.create_checkpoint(third, "p3", "a")
    error = info.value
    assert (error.limit, error.holders) == (2, ["p1", "p2"])
    assert (error.plan_id, error.resource, error.operation) == ("p3", "third", "acquire")
    stats = handler.stats()
    assert (stats.active_plans, stats.open_connections, stats.wait_timeouts) == (2, 2, 1)
    handler.release_plan("p1")
    handler.create_checkpoint(third, "p3", "a")  # a slot is free again
    assert handler.stats().active_plans == 2


def test_idle_connections_are_reused_and_bounded(
    make_handler: MakeHandler,
    resource: Resource,
    db_path: Path,
    file_fds: Callable[..., int],
) -> None:
    handler = make_handler(max_connections=2)
    for index in range(20):
        with handler.connection(resource, f"p{index}") as conn:
            conn.execute("INSERT INTO t VALUES (?)", (str(index),))
        handler.release_plan(f"p{index}")
    stats = handler.stats()
    assert (stats.open_connections, stats.idle_connections, stats.commits) == (1, 1, 20)
    assert file_fds(db_path) <= 3


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
        _wait_until(lambda n=index + 1: _queued(handler) == n)
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
    _wait_until(lambda: _queued(handler) == 1)
    handler.release_plan("holder")
    assert late.finish().depth == 1
    assert _queued(handler) == 0


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


def test_evict_lru_rolls_back_the_least_recently_used_plan(
    make_handler: MakeHandler, resource: Resource, tmp_path: Path, db_path: Path, rows: Any
) -> None:
    handler = make_handler(max_connections=2, on_full="evict_lru")
    other = _second_database(tmp_path)
    third = _second_database(tmp_path, "third")
    handler.create_checkpoint(resource, "old", "before")
    with handler.connection(resource, "old") as conn:
        conn.execute("INSERT INTO t VALUES ('old')")
    handler.create_checkpoint(other, "recent", "a")
    handler.create_checkpoint(third, "new", "a")
    assert handler.stats().evicted == 1
    assert rows(db_path, "SELECT v FROM t") == []
    with pytest.raises(CheckpointEvictedError) as info:
        handler.create_checkpoint(resource, "old", "again")
    error = info.value
    assert (error.plan_id, error.checkpoint_id, error.resource, error.operation) == (
        "old",
        "before",
        "db",
        "create_checkpoint",
    )
    handler.release_plan("old")  # raised once; now it is simply a finished plan
    handler.release_plan("recent")
    handler.release_plan("new")
    assert handler.stats().active_plans == 0


def test_evict_lru_never_evicts_a_plan_mid_statement(
    make_handler: MakeHandler, resource: Resource, tmp_path: Path, db_path: Path, rows: Any
) -> None:
    handler = make_handler(max_connections=2, on_full="evict_lru", acquire_timeout="300ms")
    other = _second_database(tmp_path)
    third = _second_database(tmp_path, "third")
    inside = threading.Event()
    done = threading.Event()

    def busy_plan() -> None:
        with handler.connection(resource, "busy") as conn:
            conn.execute("INSERT INTO t VALUES ('busy')")
            inside.set()
            assert done.wait(20)
        handler.release_plan("busy")

    worker = _Worker(busy_plan)
    worker.start()
    assert inside.wait(10)
    # "busy" is now the least recently used plan, but it is inside connection().
    handler.create_checkpoint(other, "idle", "a")
    handler.create_checkpoint(third, "newcomer", "a")
    assert handler.stats().evicted == 1
    with pytest.raises(CheckpointEvictedError):
        handler.rollback_to(other, "idle", "a")
    # With every slot mid-statement, nobody can be evicted: wait, then give up.
    with handler.connection(third, "newcomer"), pytest.raises(PoolExhaustedError) as info:
        handler.create_checkpoint(other, "another", "a")
    assert sorted(info.value.holders) == ["busy", "newcomer"]
    assert handler.stats().active_plans == 2  # "another" left nothing behind
    done.set()
    worker.finish()
    assert rows(db_path, "SELECT v FROM t") == [("busy",)]
    handler.release_plan("newcomer")


def test_a_plan_never_evicts_itself_while_using_its_connection(
    make_handler: MakeHandler, resource: Resource, tmp_path: Path
) -> None:
    handler = make_handler(max_connections=1, on_full="evict_lru", acquire_timeout="200ms")
    other = _second_database(tmp_path)
    handler.create_checkpoint(resource, "p1", "a")
    with handler.connection(resource, "p1"), pytest.raises(PoolExhaustedError):
        handler.create_checkpoint(other, "p2", "a")
    with handler.connection(resource, "p1"), pytest.raises(PoolExhaustedError):
        handler.create_checkpoint(other, "p1", "b")  # its own second database
    assert handler.stats().evicted == 0
    handler.release_plan("p1")
