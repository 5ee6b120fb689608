"""The pool's bookkeeping alone: no database, no threads, no clock but the one passed in."""

from __future__ import annotations

import threading

from cleveragents.resource.handlers._pool import ConnectionPool


class Db:
    """A stand-in for the handler's database entry: only its identity matters here."""

    def __init__(self, identity: str) -> None:
        self.identity = identity


def make_pool(limit: int = 2, idle_timeout: float = 10.0) -> ConnectionPool:
    return ConnectionPool(threading.Lock(), limit, idle_timeout)


def test_reserve_counts_up_to_the_limit_and_release_slot_gives_back() -> None:
    pool = make_pool(limit=2)
    assert pool.reserve() and pool.reserve()
    assert not pool.reserve()
    assert pool.open == 2
    pool.release_slot()
    assert pool.open == 1
    assert pool.reserve()


def test_an_idle_connection_is_lent_only_for_its_database_and_config() -> None:
    pool = make_pool()
    a, b = Db("a"), Db("b")
    conn = object()
    assert pool.reserve()
    assert pool.put_idle(a, conn, ("full",), now=0.0)  # the first idle one arms the sweep
    assert pool.pop_idle(b, ("full",)) is None
    assert pool.pop_idle(a, ("normal",)) is None
    assert pool.pop_idle(a, ("full",)) is conn
    assert len(pool) == 0
    assert pool.open == 1  # a lent connection keeps its slot


def test_the_most_recently_used_is_lent_and_the_least_recently_used_gives_its_slot() -> None:
    pool = make_pool(limit=3)
    db = Db("a")
    older, newer = object(), object()
    pool.reserve()
    pool.reserve()
    pool.put_idle(db, older, None, now=1.0)
    assert not pool.put_idle(db, newer, None, now=2.0)
    assert pool.pop_idle(db, None) is newer
    pool.put_idle(db, newer, None, now=3.0)
    taken = pool.take_oldest_idle()
    assert taken is not None and taken.conn is older
    assert pool.open == 2  # its slot passed to the caller
    assert pool.take_oldest_idle() is not None
    assert pool.take_oldest_idle() is None


def test_the_sweep_takes_what_sat_idle_past_the_timeout_and_says_when_to_look_again() -> None:
    pool = make_pool(limit=3, idle_timeout=10.0)
    db = Db("a")
    conns = [object(), object(), object()]
    for since, conn in zip((0.0, 5.0, 8.0), conns, strict=True):
        pool.reserve()
        pool.put_idle(db, conn, None, now=since)
    stale, due = pool.sweep(now=9.0)
    assert stale == [] and due == 10.0
    stale, due = pool.sweep(now=15.0)
    assert [entry.conn for entry in stale] == conns[:2]
    assert due == 18.0
    assert pool.open == 1
    stale, due = pool.sweep(now=100.0)
    assert [entry.conn for entry in stale] == conns[2:]
    assert due is None and pool.open == 0


def test_drain_takes_every_idle_connection_and_refuses_new_slots() -> None:
    pool = make_pool(limit=2)
    db = Db("a")
    pool.reserve()
    pool.reserve()
    pool.put_idle(db, object(), None, now=0.0)
    drained = pool.drain()
    assert len(drained) == 1 and pool.open == 1 and len(pool) == 0
    pool.release_slot()
    assert not pool.reserve()  # closed


def test_a_waiter_is_woken_by_a_freed_slot() -> None:
    mutex = threading.Lock()
    pool = ConnectionPool(mutex, 1, 10.0)
    with mutex:
        pool.reserve()
    woken = threading.Event()

    def wait_for_slot() -> None:
        with mutex:
            while not pool.reserve():
                pool.wait(30.0)
        woken.set()

    waiter = threading.Thread(target=wait_for_slot)
    waiter.start()
    while True:  # until the waiter waits (it says so under the mutex)
        with mutex:
            if pool.waiters:
                pool.release_slot()
                break
    waiter.join(30)
    assert woken.is_set()
    assert pool.open == 1 and pool.waiters == 0


def test_idle_databases_names_what_idle_connections_belong_to() -> None:
    pool = make_pool(limit=3)
    for name in ("a", "b", "a"):
        pool.reserve()
        pool.put_idle(Db(name), object(), None, now=0.0)
    assert pool.idle_databases() == {"a", "b"}
