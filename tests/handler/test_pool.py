"""The connection pool across plans: a bounded number of connections, waiting, evict_lru."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from cleveragents.errors import CheckpointEvictedError
from cleveragents.resource.handlers.database import DatabaseResourceHandler

from .conftest import Database

MakeHandler = Callable[..., DatabaseResourceHandler]


def _until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Wait for *condition*, which another thread makes true; say whether it came true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


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
        _until(lambda: handler.stats().waits == 1)
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
