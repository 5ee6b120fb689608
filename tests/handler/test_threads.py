"""A plan's connection across threads: one per (plan, database), used by one thread at a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from cleveragents.resource.handlers.database import ENGINES, DatabaseResourceHandler

from .conftest import Database
from .conftest import Worker as _Worker


@pytest.fixture
def slow_open(engine: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make opening a connection of the engine under test slow, and count the opens."""
    opened: list[str] = []
    engine_class = ENGINES[engine]
    real_open = engine_class.open

    def open_slowly(self: Any, settings: Any, **kwargs: Any) -> Any:
        opened.append(engine)
        time.sleep(0.2)
        return real_open(self, settings, **kwargs)

    monkeypatch.setattr(engine_class, "open", open_slowly)
    return opened


def test_simultaneous_first_calls_of_a_plan_share_one_connection(
    handler: DatabaseResourceHandler, db: Database, slow_open: list[str]
) -> None:
    resource = db.resource()
    start = threading.Barrier(4)

    def first_call(index: int) -> Any:
        start.wait()
        if index % 2:
            return handler.create_checkpoint(resource, "p1", f"cp{index}").depth
        with handler.connection(resource, "p1") as conn:
            conn.execute(f"INSERT INTO t VALUES ('row {index}')")
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
    assert db.rows() == ["row 0", "row 2"]


def test_one_connection_per_plan_per_database(
    handler: DatabaseResourceHandler, db: Database, make_db: Callable[[str], Database]
) -> None:
    resource, other = db.resource(), make_db("other").resource("other")
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


def test_any_thread_may_use_a_plans_connection_one_at_a_time(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    resource = db.resource()
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
    assert db.rows() == ["first", "second"]


def test_a_call_waiting_on_a_plan_that_ends_meanwhile_starts_afresh(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    resource = db.resource()
    waiting = threading.Event()
    results: list[BaseException | None] = []

    def second_call() -> None:
        waiting.set()
        try:
            with handler.connection(resource, "p1") as conn:
                conn.execute("INSERT INTO t VALUES ('second')")
            results.append(None)
        except BaseException as exc:
            results.append(exc)

    worker = threading.Thread(target=second_call)
    with handler.connection(resource, "p1") as conn:
        conn.execute("INSERT INTO t VALUES ('first')")
        worker.start()
        assert waiting.wait(10)
        time.sleep(0.1)  # the worker now waits for the plan's connection
        handler.rollback_plan("p1")  # from the thread that holds it
    worker.join(10)
    assert results == [None]
    assert handler.stats().active_plans == 1  # the worker began p1 again
    handler.release_plan("p1")
    assert db.rows() == ["second"]
