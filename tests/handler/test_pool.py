"""The connection pool across plans: a bounded number of connections, waiting, evict_lru."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from conftest import eventually

from cleveragents.errors import CheckpointEvictedError, PoolExhaustedError
from cleveragents.resource.handlers.database import DatabaseResourceHandler

from .conftest import Database
from .conftest import Worker as _Worker

MakeHandler = Callable[..., DatabaseResourceHandler]


@pytest.mark.timeout(30)
def test_evict_lru_wakes_a_waiting_plan_when_a_holder_leaves_its_statement(
    make_handler: MakeHandler, make_db: Callable[[str], Database]
) -> None:
    """Issue 14 item 6: the waiter used to look again only at acquire_timeout (60s here)."""
    handler = make_handler(max_connections=1, on_full="evict_lru", acquire_timeout=60)
    held_db, wanted_db = make_db("held"), make_db("wanted")
    held, wanted = held_db.resource("held"), wanted_db.resource("wanted")
    inside, leave = threading.Event(), threading.Event()

    def holder() -> None:  # mid-statement: it cannot be evicted until it leaves its block
        with handler.connection(held, "holder") as conn:
            conn.execute("INSERT INTO t VALUES ('holder')")
            inside.set()
            leave.wait(60)

    def leave_once_the_plan_waits() -> None:
        # stats() reads the count under the handler's mutex, and a waiter
        # counts itself and starts waiting in one critical section.
        eventually(lambda: handler.stats().waits == 1)
        leave.set()

    holding = threading.Thread(target=holder, daemon=True)
    holding.start()
    assert inside.wait(10)
    leaving = threading.Thread(target=leave_once_the_plan_waits, daemon=True)
    leaving.start()
    try:
        handler.execute(wanted, "waiter", "INSERT INTO t VALUES ('waiter')")
    finally:
        leave.set()
        leaving.join(10)
        holding.join(10)
    stats = handler.stats()
    assert (stats.waits, stats.wait_timeouts, stats.evicted) == (1, 0, 1)
    with pytest.raises(CheckpointEvictedError):
        handler.execute(held, "holder", "SELECT 1")
    handler.release_plan("waiter")
    assert wanted_db.rows() == ["waiter"]
    assert held_db.rows() == []


# -- a bounded pool --------------------------------------------------------------------


def test_a_freed_slot_goes_to_the_waiting_plan_at_once(
    make_handler: MakeHandler,
    db: Database,
    make_db: Callable[[str], Database],
    engine: str,
    file_fds: Callable[..., int],
) -> None:
    handler = make_handler(max_connections=1, acquire_timeout=60)
    other_db = make_db("other")
    other = other_db.resource("other")
    handler.create_checkpoint(db.resource(), "p1", "a")

    def waiting_plan() -> None:
        with handler.connection(other, "p2") as conn:
            conn.execute("INSERT INTO t VALUES ('p2')")
        handler.release_plan("p2")

    worker = _Worker(waiting_plan)
    worker.start()
    assert eventually(lambda: handler.stats().waits == 1)
    assert worker.is_alive()
    handler.release_plan("p1")
    # Far less than acquire_timeout: the release wakes the waiter.
    worker.finish(timeout=10)
    assert other_db.rows() == ["p2"]
    if engine == "sqlite":
        assert file_fds(db.where) == 0  # p1's idle connection was closed to make room
    stats = handler.stats()
    assert (stats.open_connections, stats.wait_timeouts) == (1, 0)


def test_an_exhausted_pool_names_the_plans_holding_it(
    make_handler: MakeHandler, db: Database, make_db: Callable[[str], Database]
) -> None:
    handler = make_handler(max_connections=2, acquire_timeout="200ms")
    other = make_db("other").resource("other")
    third = make_db("third").resource("third")
    handler.create_checkpoint(db.resource(), "p1", "a")
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
    make_handler: MakeHandler, db: Database, engine: str, file_fds: Callable[..., int]
) -> None:
    handler = make_handler(max_connections=2)
    resource = db.resource()
    lent: set[int] = set()
    for index in range(20):
        with handler.connection(resource, f"p{index}") as conn:
            conn.execute(f"INSERT INTO t VALUES ('{index}')")
            lent.add(id(conn))
        handler.release_plan(f"p{index}")
    stats = handler.stats()
    assert (stats.open_connections, stats.idle_connections, stats.commits) == (1, 1, 20)
    assert len(lent) == 1
    if engine == "sqlite":
        assert file_fds(db.where) <= 3


def test_idle_connections_are_closed_after_idle_timeout(
    make_handler: MakeHandler, db: Database, engine: str, file_fds: Callable[..., int]
) -> None:
    handler = make_handler(idle_timeout="200ms")
    resource = db.resource()
    for index in range(3):
        with handler.connection(resource, f"p{index}") as conn:
            conn.execute("INSERT INTO t VALUES ('x')")
        handler.release_plan(f"p{index}")
    assert handler.stats().idle_connections == 1
    if engine == "sqlite":
        assert file_fds(db.where) > 0
    assert eventually(lambda: handler.stats().open_connections == 0)
    assert handler.stats().idle_connections == 0
    if engine == "sqlite":
        assert eventually(lambda: file_fds(db.where) == 0)  # closed just after the count drops
    with handler.connection(resource, "again") as conn:  # a new one opens as needed
        conn.execute("INSERT INTO t VALUES ('y')")
    handler.release_plan("again")
    assert db.rows() == ["x", "x", "x", "y"]


# -- evict_lru ------------------------------------------------------------------------


def test_evict_lru_rolls_back_the_least_recently_used_plan(
    make_handler: MakeHandler, db: Database, make_db: Callable[[str], Database]
) -> None:
    handler = make_handler(max_connections=2, on_full="evict_lru")
    resource = db.resource()
    other = make_db("other").resource("other")
    third = make_db("third").resource("third")
    handler.create_checkpoint(resource, "old", "before")
    with handler.connection(resource, "old") as conn:
        conn.execute("INSERT INTO t VALUES ('old')")
    handler.create_checkpoint(other, "recent", "a")
    handler.create_checkpoint(third, "new", "a")
    assert handler.stats().evicted == 1
    assert db.rows() == []
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
    make_handler: MakeHandler, db: Database, make_db: Callable[[str], Database]
) -> None:
    handler = make_handler(max_connections=2, on_full="evict_lru", acquire_timeout="300ms")
    resource = db.resource()
    other = make_db("other").resource("other")
    third = make_db("third").resource("third")
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
    assert db.rows() == ["busy"]
    handler.release_plan("newcomer")


def test_a_plan_never_evicts_itself_while_using_its_connection(
    make_handler: MakeHandler, db: Database, make_db: Callable[[str], Database]
) -> None:
    handler = make_handler(max_connections=1, on_full="evict_lru", acquire_timeout="200ms")
    resource = db.resource()
    other = make_db("other").resource("other")
    handler.create_checkpoint(resource, "p1", "a")
    with handler.connection(resource, "p1"), pytest.raises(PoolExhaustedError):
        handler.create_checkpoint(other, "p2", "a")
    with handler.connection(resource, "p1"), pytest.raises(PoolExhaustedError):
        handler.create_checkpoint(other, "p1", "b")  # its own second database
    assert handler.stats().evicted == 0
    handler.release_plan("p1")


def test_an_evicted_plan_is_told_even_after_hundreds_of_later_endings(
    make_handler: MakeHandler, db: Database
) -> None:
    handler = make_handler(max_connections=1, on_full="evict_lru")
    resource = db.resource()
    handler.create_checkpoint(resource, "A", "step 1")
    handler.execute(resource, "A", "INSERT INTO t VALUES ('A step 1')")
    for number in range(200):  # each evicts the one before
        handler.execute(resource, f"other {number}", "SELECT 1")
    with pytest.raises(CheckpointEvictedError):
        handler.execute(resource, "A", "INSERT INTO t VALUES ('A step 2')")
    assert db.rows() == []
    assert handler.stats().evicted == 200
