"""close(): wakes every waiter at once, rolls back open plans, never waits without bound."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import turn_waiters, wait_until

from cleveragents.errors import HandlerClosedError
from cleveragents.resource.handlers.database import DatabaseResourceHandler

from .conftest import Database
from .conftest import Worker as _Worker

MakeHandler = Callable[..., DatabaseResourceHandler]


# -- waiters ---------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_close_wakes_a_plan_waiting_for_a_write_turn_at_once(
    make_handler: MakeHandler, db: Database, make_db: Callable[[str], Database], engine: str
) -> None:
    """Issue 14 item 8: the turn waiter got ResourceBusyError after busy_timeout (60s here)."""
    if engine != "sqlite":
        pytest.skip("only SQLite plans take turns to write")
    handler = make_handler(max_connections=4)
    other = make_db("other")
    res = db.resource(busy_timeout=60)
    # The waiting plan is the older one: close() comes to it first.
    handler.execute(other.resource("other"), "waiter", "INSERT INTO t VALUES ('waiter')")
    handler.execute(res, "holder", "INSERT INTO t VALUES ('holder')")
    waiter = _Worker(lambda: handler.execute(res, "waiter", "INSERT INTO t VALUES ('waiter')"))
    waiter.start()
    wait_until(lambda: turn_waiters(handler) == 1)
    handler.close()
    waiter.join(30)
    assert not waiter.is_alive()
    assert type(waiter.error) is HandlerClosedError
    assert db.rows() == []
    assert other.rows() == []
    assert handler.stats().open_connections == 0


# -- plans other threads are using ------------------------------------------------------

# Statements that never end on their own, and how to see from outside that they run.
_ENDLESS = {
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT running() UNION ALL SELECT x FROM c) "
    "SELECT count(*) FROM c",
    "postgresql": "SELECT pg_sleep(600)",
}


def _running(db: Database, engine: str, started: threading.Event) -> Callable[[], bool]:
    if engine == "sqlite":
        return started.is_set  # the statement itself says so (running() below)

    def active() -> bool:
        conn = db.connect()
        try:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = %s",
                (_ENDLESS["postgresql"],),
            ).fetchone()
        finally:
            conn.close()
        return bool(row[0])

    return active


def _stop(conn: Any, engine: str) -> None:
    if engine == "sqlite":
        conn.interrupt()
    else:
        conn.cancel_safe()


@pytest.mark.timeout(60)
def test_close_interrupts_a_statement_another_thread_runs_for_a_plan(
    handler: DatabaseResourceHandler, db: Database, engine: str
) -> None:
    """A plan mid-statement in another thread does not hold close() up (issue 14)."""
    res = db.resource()
    started, finished = threading.Event(), threading.Event()
    lent: list[Any] = []
    errors: list[BaseException] = []

    def tool() -> None:
        with handler.connection(res, "p") as conn:
            lent.append(conn)
            conn.execute("INSERT INTO t VALUES ('never committed')")
            if engine == "sqlite":
                conn.create_function("running", 0, started.set)
            try:
                conn.execute(_ENDLESS[engine]).fetchall()
            except Exception as exc:
                errors.append(exc)

    fired: list[bool] = []

    def watchdog() -> None:
        # Only so a regression fails instead of running forever: close() must stop it.
        if not finished.wait(30) and lent:
            fired.append(True)
            _stop(lent[0], engine)

    worker = _Worker(tool)
    worker.start()
    threading.Thread(target=watchdog, daemon=True).start()
    wait_until(_running(db, engine, started))
    try:
        handler.close()
    finally:
        finished.set()
    worker.join(30)
    assert not fired, "close() waited until the watchdog stopped the statement"
    assert worker.error is None
    (error,) = errors
    if engine == "sqlite":
        assert str(error) == "interrupted", repr(error)
    else:
        assert type(error).__name__ == "QueryCanceled", repr(error)
    stats = handler.stats()
    assert (stats.open_connections, stats.active_plans, stats.rollbacks) == (0, 0, 1)
    assert db.rows() == []


@pytest.mark.timeout(60)
def test_close_leaves_a_plan_held_in_python_code_to_its_thread(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    """A block that runs no statement cannot be interrupted: close() returns after close_wait.

    The thread in the block rolls the plan back itself when it leaves it.
    """
    res = db.resource()
    inside, leave = threading.Event(), threading.Event()

    def tool() -> None:
        with handler.connection(res, "p") as conn:
            conn.execute("INSERT INTO t VALUES ('never committed')")
            inside.set()
            assert leave.wait(50)  # thinking, in Python, holding the plan's connection

    worker = _Worker(tool)
    worker.start()
    assert inside.wait(10)
    handler.close_wait = 0.2
    try:
        handler.close()  # returns although the block still holds the plan
        assert worker.is_alive()
        stats = handler.stats()
        assert (stats.open_connections, stats.active_plans, stats.rollbacks) == (1, 0, 0)
        assert db.rows() == []
    finally:
        leave.set()
    worker.join(30)
    assert not worker.is_alive()
    assert worker.error is None
    stats = handler.stats()
    assert (stats.open_connections, stats.rollbacks, stats.commits) == (0, 1, 0)
    db.run("INSERT INTO t VALUES ('after')")  # the plan's locks are gone
    assert db.rows() == ["after"]


def test_close_wakes_a_plan_waiting_for_a_slot(
    make_handler: MakeHandler, db: Database, make_db: Callable[[str], Database]
) -> None:
    handler = make_handler(max_connections=1, acquire_timeout=60)
    other = make_db("other").resource("other")
    handler.create_checkpoint(db.resource(), "holder", "a")
    waiter = _Worker(lambda: handler.create_checkpoint(other, "waiter", "a"))
    waiter.start()
    wait_until(lambda: handler.stats().waits == 1)
    handler.close()
    waiter.join(10)
    assert not waiter.is_alive()
    assert type(waiter.error) is HandlerClosedError
    assert handler.stats().open_connections == 0


# -- closing -------------------------------------------------------------------------------


def _reaper_threads(handler: DatabaseResourceHandler) -> list[threading.Thread]:
    name = f"cleveragents-reaper[{handler.name}]"
    return [thread for thread in threading.enumerate() if thread.name == name]


def test_close_rolls_back_and_later_calls_raise(db: Database, fd_count: Callable[[], int]) -> None:
    resource = db.resource()
    baseline = fd_count()
    handler = DatabaseResourceHandler(max_connections=2)
    with handler.connection(resource, "open") as conn:
        conn.execute("INSERT INTO t VALUES ('never committed')")
    closers = [threading.Thread(target=handler.close) for _ in range(4)]
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join(10)
    handler.close()
    assert handler.is_closed
    assert "closed" in repr(handler)
    assert db.rows() == []
    assert fd_count() == baseline
    assert _reaper_threads(handler) == []
    for call in (
        lambda: handler.create_checkpoint(resource, "p", "a"),
        lambda: handler.rollback_to(resource, "p", "a"),
        lambda: handler.release_plan("p"),
        lambda: handler.rollback_plan("p"),
        lambda: handler.connection(resource, "p").__enter__(),
    ):
        with pytest.raises(HandlerClosedError) as info:
            call()
        assert info.value.handler == handler.name
    assert handler.stats().rollbacks == 1


def test_context_manager_closes(db: Database, engine: str, file_fds: Callable[..., int]) -> None:
    with DatabaseResourceHandler() as handler:
        with handler.connection(db.resource(), "p1") as conn:
            conn.execute("INSERT INTO t VALUES ('rolled back on exit')")
        assert not handler.is_closed
    assert handler.is_closed
    assert db.rows("SELECT count(*) FROM t") == [0]
    assert handler.stats().open_connections == 0
    if engine == "sqlite":
        assert file_fds(db.where) == 0


def test_close_inside_a_connection_block_does_not_wait_for_itself(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    resource = db.resource()
    releasing: threading.Thread | None = None
    with handler.connection(resource, "p1") as conn:
        conn.execute("INSERT INTO t VALUES ('mine')")
        # Another thread starts releasing the plan: it waits for this block.
        releasing = _Worker(lambda: handler.release_plan("p1"))
        releasing.start()
        wait_until(lambda: handler.stats().active_plans == 0)  # it took the plan out
        started = time.monotonic()
        handler.close()  # must not wait for a plan only this block holds up
        assert time.monotonic() - started < 5
    releasing.join(10)
    assert not releasing.is_alive()
    assert handler.stats().open_connections == 0
