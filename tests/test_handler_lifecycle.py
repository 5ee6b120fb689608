"""Handler lifecycle: reaper, idle timeout, bounded descriptors, async twins, close, fork, GC."""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cleveragents.errors import (
    CheckpointEvictedError,
    CheckpointExpiredError,
    CheckpointNotFoundError,
    HandlerClosedError,
    PoolExhaustedError,
    ResourceBusyError,
    ResourceError,
)
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.resource.handlers.sqlite import SQLiteEngine

MakeHandler = Callable[..., DatabaseResourceHandler]


def _database(path: Path | str, name: str = "db", **options: Any) -> Resource:
    return Resource(name=name, kind="database", engine="sqlite", location=str(path), **options)


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.01)


def _reaper_threads(handler: DatabaseResourceHandler) -> list[threading.Thread]:
    name = f"cleveragents-reaper[{handler.name}]"
    return [thread for thread in threading.enumerate() if thread.name == name]


def _insert(handler: DatabaseResourceHandler, resource: Resource, plan_id: str, value: str) -> None:
    with handler.connection(resource, plan_id) as conn:
        conn.execute("INSERT INTO t VALUES (?)", (value,))


# -- the reaper -------------------------------------------------------------------------


def test_the_reaper_starts_with_the_first_plan(
    handler: DatabaseResourceHandler, resource: Resource
) -> None:
    handler.stats()
    assert _reaper_threads(handler) == []
    handler.create_checkpoint(resource, "p1", "a")
    (thread,) = _reaper_threads(handler)
    assert thread.daemon
    handler.close()
    assert not thread.is_alive()


def test_the_reaper_sleeps_without_a_timeout_when_nothing_is_due(
    make_handler: MakeHandler, db_path: Path
) -> None:
    handler = make_handler(max_connections=2, idle_timeout="200ms")
    waits: list[float | None] = []
    wakeup = handler._reaper._wakeup
    real_wait = wakeup.wait

    def recording_wait(timeout: float | None = None) -> bool:
        waits.append(timeout)
        return real_wait(timeout)

    wakeup.wait = recording_wait  # type: ignore[method-assign]
    resource = _database(db_path, checkpoint_ttl="300ms")
    handler.create_checkpoint(resource, "p1", "a")
    handler.release_plan("p1")
    # The idle connection is closed after 200ms, the cancelled deadline passes
    # after 300ms; then nothing is scheduled.
    _wait_until(lambda: handler.stats().open_connections == 0)
    _wait_until(lambda: bool(waits) and waits[-1] is None)
    settled = len(waits)
    time.sleep(0.5)
    assert len(waits) == settled  # no wake-ups while idle
    assert all(timeout is None or timeout > 0.05 for timeout in waits)  # no polling
    assert len(waits) <= 6


def test_an_idle_plan_is_reaped_and_its_next_call_raises_once(
    handler: DatabaseResourceHandler, db_path: Path, rows: Any
) -> None:
    resource = _database(db_path, checkpoint_ttl="200ms")
    handler.create_checkpoint(resource, "p1", "first")
    handler.create_checkpoint(resource, "p1", "second")
    _insert(handler, resource, "p1", "doomed")
    _wait_until(lambda: handler.stats().reaped == 1)
    assert rows(db_path, "SELECT v FROM t") == []
    stats = handler.stats()
    assert (stats.active_plans, stats.rollbacks, stats.commits) == (0, 1, 0)
    assert stats.open_connections == stats.idle_connections
    with pytest.raises(CheckpointExpiredError) as info:
        handler.release_plan("p1")
    error = info.value
    assert (error.plan_id, error.checkpoint_id, error.resource, error.operation) == (
        "p1",
        "second",
        "db",
        "release_plan",
    )
    assert error.ttl == pytest.approx(0.2)
    assert error.age >= 0.2
    assert "checkpoint_ttl (0.2s)" in str(error)
    handler.release_plan("p1")  # raised once: now it is an unknown plan
    assert handler.stats().commits == 0


def test_a_plan_in_use_is_not_reaped(
    handler: DatabaseResourceHandler, db_path: Path, rows: Any
) -> None:
    resource = _database(db_path, checkpoint_ttl="300ms")
    for index in range(6):  # 0.6s in all, never 300ms without a call
        _insert(handler, resource, "p1", str(index))
        time.sleep(0.1)
    with handler.connection(resource, "p1") as conn:
        time.sleep(0.6)  # mid-statement past the TTL: the reaper must wait
        conn.execute("INSERT INTO t VALUES ('long')")
    handler.release_plan("p1")
    assert handler.stats().reaped == 0
    assert len(rows(db_path, "SELECT v FROM t")) == 7


def test_idle_time_counts_from_the_last_call_on_any_resource(
    handler: DatabaseResourceHandler, db_path: Path, tmp_path: Path, rows: Any
) -> None:
    first = _database(db_path, checkpoint_ttl="300ms")
    other_path = tmp_path / "other.db"
    sqlite3.connect(other_path).execute("CREATE TABLE t (v TEXT)").connection.close()
    second = _database(other_path, "other", checkpoint_ttl="300ms")
    _insert(handler, first, "p1", "first")
    for index in range(6):  # only the second database is used, for 0.6s
        _insert(handler, second, "p1", str(index))
        time.sleep(0.1)
    handler.release_plan("p1")
    assert handler.stats().reaped == 0
    assert rows(db_path, "SELECT v FROM t") == [("first",)]
    assert len(rows(other_path, "SELECT v FROM t")) == 6


def test_the_smallest_ttl_of_a_plans_resources_applies(
    handler: DatabaseResourceHandler, db_path: Path, tmp_path: Path
) -> None:
    patient = _database(db_path, checkpoint_ttl=60)
    other_path = tmp_path / "other.db"
    sqlite3.connect(other_path).close()
    hasty = _database(other_path, "hasty", checkpoint_ttl="200ms")
    handler.create_checkpoint(patient, "p1", "a")
    handler.create_checkpoint(hasty, "p1", "b")
    _wait_until(lambda: handler.stats().reaped == 1)
    with pytest.raises(CheckpointExpiredError) as info:
        handler.create_checkpoint(patient, "p1", "c")
    assert info.value.ttl == pytest.approx(0.2)


def test_the_handler_ttl_applies_when_a_resource_sets_none(
    make_handler: MakeHandler, resource: Resource
) -> None:
    handler = make_handler(checkpoint_ttl="200ms")
    handler.create_checkpoint(resource, "p1", "a")
    _wait_until(lambda: handler.stats().reaped == 1)
    with pytest.raises(CheckpointExpiredError):
        handler.rollback_to(resource, "p1", "a")


def test_plans_that_end_in_time_leave_nothing_for_the_reaper(
    handler: DatabaseResourceHandler, resource: Resource
) -> None:
    scheduled: list[Any] = []
    real_schedule = handler._reaper.schedule

    def counting_schedule(when: float, key: Any) -> Any:
        scheduled.append(key)
        return real_schedule(when, key)

    handler._reaper.schedule = counting_schedule  # type: ignore[method-assign]
    for index in range(200):
        handler.create_checkpoint(resource, f"p{index}", "a")
        handler.release_plan(f"p{index}")
    # One deadline sweeps every plan, one closes idle connections: none per plan.
    assert sorted(scheduled) == ["idle", "plans"]
    assert len(handler._reaper) == 2


def test_a_plan_begun_after_the_sweep_was_set_is_reaped_at_its_own_ttl(
    handler: DatabaseResourceHandler, db_path: Path
) -> None:
    resource = _database(db_path, checkpoint_ttl="300ms")
    handler.create_checkpoint(resource, "early", "a")
    handler.release_plan("early")  # the sweep stays set for 300ms after "early" began
    time.sleep(0.15)
    began = time.monotonic()
    handler.create_checkpoint(resource, "late", "a")
    time.sleep(0.2)  # past the sweep, short of late's own TTL
    assert handler.stats().reaped == 0
    _wait_until(lambda: handler.stats().reaped == 1)
    assert time.monotonic() - began >= 0.3
    with pytest.raises(CheckpointExpiredError):
        handler.release_plan("late")


def test_a_new_plan_with_a_shorter_ttl_is_reaped_first(
    handler: DatabaseResourceHandler, db_path: Path, tmp_path: Path
) -> None:
    patient = _database(db_path, checkpoint_ttl=60)
    other_path = tmp_path / "other.db"
    sqlite3.connect(other_path).close()
    hasty = _database(other_path, "hasty", checkpoint_ttl="200ms")
    handler.create_checkpoint(patient, "slow", "a")  # sets the sweep 60s away
    handler.create_checkpoint(hasty, "quick", "a")  # must bring it forward
    _wait_until(lambda: handler.stats().reaped == 1)
    with pytest.raises(CheckpointExpiredError):
        handler.release_plan("quick")
    handler.release_plan("slow")


def test_connection_lends_nothing_until_the_block_is_entered(
    handler: DatabaseResourceHandler, resource: Resource
) -> None:
    lending = handler.connection(resource, "p1")
    assert handler.stats().active_plans == 0
    with lending as conn:
        assert handler.stats().active_plans == 1
        conn.execute("INSERT INTO t VALUES ('x')")
    handler.rollback_plan("p1")
    assert handler.stats().active_plans == 0


def test_idle_connections_are_closed_after_idle_timeout(
    make_handler: MakeHandler,
    resource: Resource,
    db_path: Path,
    file_fds: Callable[..., int],
) -> None:
    handler = make_handler(idle_timeout="200ms")
    for index in range(3):
        _insert(handler, resource, f"p{index}", "x")
        handler.release_plan(f"p{index}")
    assert handler.stats().idle_connections == 1
    assert file_fds(db_path) > 0
    _wait_until(lambda: handler.stats().open_connections == 0)
    assert handler.stats().idle_connections == 0
    _wait_until(lambda: file_fds(db_path) == 0)  # closed just after the count drops
    _insert(handler, resource, "again", "y")  # a new connection opens as needed
    handler.release_plan("again")


def test_only_the_latest_endings_are_remembered_once_old_enough(
    make_handler: MakeHandler, db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = make_handler(max_connections=4)
    handler._plans.endings.max_kept = 2
    handler._plans.endings.keep_for = 0.0
    for index in range(3):
        path = tmp_path / f"db{index}.db"
        handler.create_checkpoint(
            _database(path, f"db{index}", checkpoint_ttl="100ms"), f"p{index}", "a"
        )
    _wait_until(lambda: handler.stats().reaped == 3)
    handler.release_plan("p0")  # forgotten: a plain unknown plan now
    for plan_id in ("p1", "p2"):
        with pytest.raises(CheckpointExpiredError):
            handler.release_plan(plan_id)


def test_rollback_to_a_checkpoint_that_is_not_there(
    handler: DatabaseResourceHandler, resource: Resource
) -> None:
    with pytest.raises(CheckpointNotFoundError) as info:
        handler.rollback_to(resource, "never-started", "a")
    error = info.value
    assert isinstance(error, LookupError)
    assert (error.plan_id, error.checkpoint_id, error.resource, error.operation) == (
        "never-started",
        "a",
        "db",
        "rollback_to",
    )
    assert handler.stats().active_plans == 0
    handler.create_checkpoint(resource, "p1", "first")
    handler.create_checkpoint(resource, "p1", "second")
    handler.rollback_to(resource, "p1", "first")  # forgets "second"
    with pytest.raises(CheckpointNotFoundError):
        handler.rollback_to(resource, "p1", "second")
    assert handler.stats().checkpoints == 1
    handler.rollback_plan("p1")


def test_a_call_waiting_on_a_plan_that_ends_meanwhile_starts_afresh(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Any
) -> None:
    waiting = threading.Event()
    results: list[BaseException | None] = []

    def second_call() -> None:
        waiting.set()
        try:
            _insert(handler, resource, "p1", "second")
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
    assert rows(db_path, "SELECT v FROM t") == [("second",)]


def test_forgotten_databases_keep_the_bookkeeping_bounded(
    make_handler: MakeHandler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = make_handler(max_connections=2)
    handler._resolver.max_entries = 4
    held = _database(tmp_path / "held.db", "held", busy_timeout="100ms")
    handler.create_checkpoint(held, "holder", "a")
    for index in range(12):
        resource = _database(tmp_path / f"db{index}.db", f"db{index}")
        handler.create_checkpoint(resource, f"p{index}", "a")
        handler.release_plan(f"p{index}")
    for index in range(12):  # many spellings of one database
        variant = _database(tmp_path / "shared.db", f"shared{index}", busy_timeout=index + 1)
        handler.create_checkpoint(variant, "shared", "a")
        handler.release_plan("shared")
    assert len(handler._resolver.databases) <= 5
    assert len(handler._resolver) <= 4
    # The database a live plan holds was kept, with its write turn.
    with pytest.raises(ResourceBusyError) as info:
        handler.create_checkpoint(held, "late", "a")
    assert info.value.holder == "holder"
    handler.release_plan("holder")


def test_interrupt_stops_statements_of_every_plan(
    handler: DatabaseResourceHandler, resource: Resource
) -> None:
    handler.interrupt()  # nothing running: harmless
    started = threading.Event()
    errors: list[BaseException] = []
    query = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 100000000) "
        "SELECT count(*) FROM c"
    )

    def long_statement() -> None:
        with handler.connection(resource, "p1") as conn:
            started.set()
            try:
                conn.execute(query).fetchall()
            except sqlite3.OperationalError as exc:
                errors.append(exc)

    worker = threading.Thread(target=long_statement)
    worker.start()
    assert started.wait(10)
    while worker.is_alive():  # an interrupt before the statement starts is lost
        handler.interrupt()
        worker.join(0.05)
    assert [str(error) for error in errors] == ["interrupted"]
    handler.rollback_plan("p1")
    assert handler.stats().active_plans == 0


def test_switching_a_locked_file_to_wal_waits_within_busy_timeout(
    make_handler: MakeHandler, tmp_path: Path, rows: Any
) -> None:
    handler = make_handler(max_connections=2)
    path = tmp_path / "fresh.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (v TEXT)")
    # A writer in rollback-journal mode: the schema can be read, the journal
    # mode cannot be changed until it finishes.
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES ('rolled back')")
    try:
        with pytest.raises(ResourceBusyError) as info:
            handler.create_checkpoint(_database(path, busy_timeout="200ms"), "p1", "a")
        assert info.value.operation == "open"
        assert handler.stats().open_connections == 0
        threading.Timer(0.2, other.rollback).start()
        patient = _database(path, busy_timeout=10)
        _insert(handler, patient, "p2", "after the lock")
    finally:
        time.sleep(0.3)
        other.close()
    handler.release_plan("p2")
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]
    assert rows(path, "SELECT v FROM t") == [("after the lock",)]


# -- memory databases ----------------------------------------------------------------


def test_a_memory_database_is_shared_by_plans_and_outlives_idle_timeout(
    make_handler: MakeHandler,
) -> None:
    handler = make_handler(max_connections=2, idle_timeout="100ms")
    memory = _database(":memory:", "scratch", busy_timeout="200ms")
    with handler.connection(memory, "setup") as conn:
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.execute("INSERT INTO t VALUES ('kept')")
    handler.release_plan("setup")
    with handler.connection(memory, "undone") as conn:
        conn.execute("INSERT INTO t VALUES ('undone')")
        with pytest.raises(ResourceError) as info:
            handler.create_checkpoint(memory, "waiting", "a")  # its turn does not come
        assert info.value.plan_id == "waiting"
    handler.rollback_plan("undone")
    time.sleep(0.3)  # past idle_timeout
    stats = handler.stats()
    assert (stats.open_connections, stats.idle_connections) == (1, 0)
    assert handler.execute(memory, "reader", "SELECT v FROM t") == [("kept",)]
    handler.release_plan("reader")
    other = _database(":memory:", "other")
    assert handler.execute(other, "p", "SELECT count(*) FROM sqlite_master") == [(0,)]
    handler.release_plan("p")
    assert handler.stats().open_connections == 2


# -- many plans, bounded descriptors ---------------------------------------------------------


def test_two_thousand_plans_keep_descriptors_bounded(
    make_handler: MakeHandler,
    db_path: Path,
    rows: Any,
    fd_count: Callable[..., int],
) -> None:
    max_connections = 4
    baseline = fd_count()
    handler = make_handler(max_connections=max_connections)
    resource = _database(db_path, synchronous="normal")
    peak = baseline
    for index in range(2000):
        plan_id = f"p{index}"
        handler.create_checkpoint(resource, plan_id, "start")
        _insert(handler, resource, plan_id, str(index))
        if index % 2:
            handler.release_plan(plan_id)
        else:
            handler.rollback_plan(plan_id)
        if index % 50 == 0:
            peak = max(peak, fd_count())
    assert peak - baseline <= 2 * max_connections + 3
    stats = handler.stats()
    assert (stats.commits, stats.rollbacks, stats.active_plans) == (1000, 1000, 0)
    handler.close()
    assert fd_count() == baseline
    assert rows(db_path, "SELECT count(*), min(CAST(v AS INT) % 2) FROM t") == [(1000, 1)]


# -- async -----------------------------------------------------------------------------


def test_async_twins_do_what_their_sync_methods_do(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, rows: Any
) -> None:
    async def scenario() -> None:
        cp = await handler.acreate_checkpoint(resource, "kept", "start")
        assert (cp.plan_id, cp.checkpoint_id, cp.depth) == ("kept", "start", 1)
        await asyncio.to_thread(_insert, handler, resource, "kept", "undone")
        await handler.arollback_to(resource, "kept", "start")
        await asyncio.to_thread(_insert, handler, resource, "kept", "kept")
        await handler.arelease_plan("kept")
        await handler.acreate_checkpoint(resource, "dropped", "start")
        await asyncio.to_thread(_insert, handler, resource, "dropped", "dropped")
        await handler.arollback_plan("dropped")
        with pytest.raises(CheckpointNotFoundError):
            await handler.arollback_to(resource, "dropped", "start")

    asyncio.run(scenario())
    assert rows(db_path, "SELECT v FROM t") == [("kept",)]
    assert handler.stats().active_plans == 0


def _sample_peak(
    count: Callable[[Path], int], path: Path, stop: threading.Event, peak: list[int]
) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], count(path))
        time.sleep(0.002)


def _run_with_executor(main: Callable[[], Any], threads: int) -> None:
    """Run coroutine function *main* with a default executor of *threads* threads."""

    async def wrapper() -> None:
        executor = ThreadPoolExecutor(threads)
        asyncio.get_running_loop().set_default_executor(executor)
        try:
            await main()
            # Make sure every pool thread has run handler code at least once.
            barrier = threading.Barrier(threads)
            await asyncio.gather(*(asyncio.to_thread(barrier.wait, 10) for _ in range(threads)))
        finally:
            executor.shutdown(wait=True)

    asyncio.run(wrapper())


def test_forty_plans_on_a_32_thread_executor_hold_few_descriptors(
    make_handler: MakeHandler,
    db_path: Path,
    rows: Any,
    fd_count: Callable[..., int],
    file_fds: Callable[..., int],
) -> None:
    max_connections = 8
    handler = make_handler(max_connections=max_connections, acquire_timeout=30)
    resource = _database(db_path, synchronous="normal", busy_timeout=30)
    baseline = fd_count()

    def plan(index: int) -> None:
        plan_id = f"p{index}"
        handler.create_checkpoint(resource, plan_id, "start")
        _insert(handler, resource, plan_id, f"undone {index}")
        handler.rollback_to(resource, plan_id, "start")
        _insert(handler, resource, plan_id, str(index))
        (handler.release_plan if index % 2 else handler.rollback_plan)(plan_id)

    async def main() -> None:
        for _ in range(3):
            await asyncio.gather(*(asyncio.to_thread(plan, index) for index in range(40)))

    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_sample_peak, args=(file_fds, db_path, stop, peak))
    sampler.start()
    try:
        _run_with_executor(main, threads=32)
    finally:
        stop.set()
        sampler.join()
    assert 0 < peak[0] <= 2 * max_connections + 1
    assert rows(db_path, "SELECT count(*), count(DISTINCT v) FROM t") == [(60, 20)]
    assert rows(db_path, "SELECT count(*) FROM t WHERE v LIKE 'undone%'") == [(0,)]
    handler.close()
    assert file_fds(db_path) == 0
    assert fd_count() <= baseline


def test_async_twins_from_many_pool_threads_hold_few_descriptors(
    make_handler: MakeHandler,
    db_path: Path,
    rows: Any,
    file_fds: Callable[..., int],
) -> None:
    max_connections = 8
    handler = make_handler(max_connections=max_connections, acquire_timeout=30)
    resource = _database(db_path, synchronous="normal", busy_timeout=30)
    # A plan holding the write turn needs a pool thread for its next call, so
    # fewer plans than threads may wait for the turn at once.
    in_flight = asyncio.Semaphore(16)

    async def plan(index: int) -> None:
        plan_id = f"p{index}"
        async with in_flight:
            await handler.acreate_checkpoint(resource, plan_id, "start")
            await asyncio.to_thread(_insert, handler, resource, plan_id, f"undone {index}")
            await handler.arollback_to(resource, plan_id, "start")
            await asyncio.to_thread(_insert, handler, resource, plan_id, str(index))
            if index % 2:
                await handler.arelease_plan(plan_id)
            else:
                await handler.arollback_plan(plan_id)

    async def main() -> None:
        await asyncio.gather(*(plan(index) for index in range(40)))

    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_sample_peak, args=(file_fds, db_path, stop, peak))
    sampler.start()
    try:
        _run_with_executor(main, threads=32)
    finally:
        stop.set()
        sampler.join()
    assert 0 < peak[0] <= 2 * max_connections + 1
    assert rows(db_path, "SELECT count(*), count(DISTINCT v) FROM t") == [(20, 20)]
    assert handler.stats().active_plans == 0
    handler.close()
    assert file_fds(db_path) == 0


# -- close -----------------------------------------------------------------------------------


def test_close_rolls_back_and_later_calls_raise(
    resource: Resource,
    db_path: Path,
    rows: Any,
    fd_count: Callable[..., int],
) -> None:
    baseline = fd_count()
    handler = DatabaseResourceHandler(max_connections=2)
    _insert(handler, resource, "open", "never committed")
    closers = [threading.Thread(target=handler.close) for _ in range(4)]
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join(10)
    handler.close()
    assert handler.is_closed
    assert "closed" in repr(handler)
    assert rows(db_path, "SELECT v FROM t") == []
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


def test_close_wakes_a_plan_waiting_for_a_slot(resource: Resource, tmp_path: Path) -> None:
    handler = DatabaseResourceHandler(max_connections=1, acquire_timeout=60)
    other_path = tmp_path / "other.db"
    sqlite3.connect(other_path).close()
    handler.create_checkpoint(resource, "holder", "a")
    errors: list[BaseException] = []

    def wait_for_slot() -> None:
        try:
            handler.create_checkpoint(_database(other_path, "other"), "waiter", "a")
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_slot)
    waiter.start()
    _wait_until(lambda: handler.stats().waits == 1)
    handler.close()
    waiter.join(10)
    assert not waiter.is_alive()
    assert [type(error) for error in errors] == [HandlerClosedError]
    assert handler.stats().open_connections == 0


def test_context_manager_closes(
    resource: Resource, db_path: Path, rows: Any, file_fds: Callable[..., int]
) -> None:
    with DatabaseResourceHandler() as handler:
        _insert(handler, resource, "p1", "rolled back on exit")
        assert not handler.is_closed
    assert handler.is_closed
    assert rows(db_path, "SELECT count(*) FROM t") == [(0,)]
    assert file_fds(db_path) == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_connections": 0}, "max_connections"),
        ({"on_full": "panic"}, "on_full"),
        ({"acquire_timeout": "soon"}, "acquire_timeout"),
        ({"checkpoint_ttl": 0}, "checkpoint_ttl"),
    ],
)
def test_bad_handler_settings_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"DatabaseResourceHandler: {message}"):
        DatabaseResourceHandler(**options)


def test_from_config_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEVERAGENTS_MAX_CONNECTIONS", "3")
    monkeypatch.setenv("CLEVERAGENTS_IDLE_TIMEOUT", "2m")
    with DatabaseResourceHandler.from_config(acquire_timeout="1s", on_full=None, name="cfg") as h:
        assert (h.config.max_connections, h.config.idle_timeout) == (3, 120.0)
        assert (h.config.acquire_timeout, h.config.on_full, h.name) == (1.0, "wait", "cfg")


def test_an_exhausted_wait_after_close_is_not_a_pool_error(resource: Resource) -> None:
    handler = DatabaseResourceHandler(max_connections=1, acquire_timeout="100ms")
    handler.close()
    with pytest.raises(HandlerClosedError):
        handler.create_checkpoint(resource, "p", "a")
    assert not isinstance(HandlerClosedError("x"), PoolExhaustedError)


# -- fork ---------------------------------------------------------------------------------


def _in_child(check: Callable[[], None]) -> int:
    """Run *check* in a forked child; return its exit status (0 when it passed)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which exits without coverage data
        code = 1
        try:
            check()
            code = 0
        except BaseException as exc:
            os.write(2, f"child check failed: {exc!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_child_starts_empty_and_leaves_the_parents_plans_alone(
    handler: DatabaseResourceHandler, resource: Resource, db_path: Path, tmp_path: Path, rows: Any
) -> None:
    handler.create_checkpoint(resource, "parent", "a")
    _insert(handler, resource, "parent", "from parent")
    child_path = tmp_path / "child.db"
    sqlite3.connect(child_path).execute("CREATE TABLE t (v TEXT)").connection.close()
    child_db = _database(child_path, "child")

    def child() -> None:
        stats = handler.stats()
        assert (stats.active_plans, stats.open_connections, stats.checkpoints) == (0, 0, 0)
        assert _reaper_threads(handler) == []
        handler.release_plan("parent")  # not this process's plan: nothing happens
        handler.rollback_plan("parent")
        _insert(handler, child_db, "child", "from child")
        handler.release_plan("child")
        handler.close()
        gc.collect()

    assert _in_child(child) == 0
    assert rows(child_path, "SELECT v FROM t") == [("from child",)]
    # The parent's plan and connection were untouched by the child.
    assert handler.stats().active_plans == 1
    _insert(handler, resource, "parent", "after the fork")
    handler.release_plan("parent")
    assert sorted(rows(db_path, "SELECT v FROM t")) == [("after the fork",), ("from parent",)]
    assert rows(db_path, "PRAGMA integrity_check") == [("ok",)]


def test_a_plan_evicted_in_the_parent_is_not_the_childs_business(
    make_handler: MakeHandler, resource: Resource, tmp_path: Path
) -> None:
    handler = make_handler(max_connections=1, on_full="evict_lru")
    handler.create_checkpoint(resource, "old", "a")
    handler.create_checkpoint(_database(tmp_path / "new.db", "new"), "new", "a")

    def child() -> None:
        handler.release_plan("old")  # the parent's ending is not inherited

    assert _in_child(child) == 0
    with pytest.raises(CheckpointEvictedError):
        handler.release_plan("old")
    handler.release_plan("new")


# -- garbage collection -----------------------------------------------------------------------


def test_a_forgotten_handler_is_finalized_with_a_warning(
    resource: Resource,
    db_path: Path,
    rows: Any,
    fd_count: Callable[..., int],
) -> None:
    baseline = fd_count()
    handler = DatabaseResourceHandler(max_connections=2, name="forgotten")
    _insert(handler, resource, "finished", "committed")
    handler.release_plan("finished")
    _insert(handler, resource, "open-plan", "never committed")
    assert len(_reaper_threads(handler)) == 1
    with pytest.warns(ResourceWarning, match=r"'forgotten' was not closed.*\['open-plan'\]"):
        del handler
        gc.collect()
    reaper = [t for t in threading.enumerate() if t.name == "cleveragents-reaper[forgotten]"]
    assert reaper == []
    assert fd_count() == baseline
    assert rows(db_path, "SELECT v FROM t") == [("committed",)]


def test_the_finalizer_frees_idle_and_memory_connections_despite_errors(
    resource: Resource,
    db_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rows: Any,
    fd_count: Callable[..., int],
) -> None:
    baseline = fd_count()
    handler = DatabaseResourceHandler(max_connections=4, name="messy")
    memory = _database(":memory:", "scratch")
    handler.execute(memory, "memory-plan", "CREATE TABLE m (v TEXT)")
    other_path = tmp_path / "other.db"
    sqlite3.connect(other_path).execute("CREATE TABLE t (v TEXT)").connection.close()
    _insert(handler, _database(other_path, "other"), "idle-soon", "committed")
    handler.release_plan("idle-soon")  # its connection is idle now
    _insert(handler, resource, "open-plan", "rolled back")
    real_rollback, real_close = SQLiteEngine.rollback, SQLiteEngine.close

    def failing_rollback(self: SQLiteEngine, conn: sqlite3.Connection) -> None:
        real_rollback(self, conn)
        raise sqlite3.OperationalError("rollback failed")

    def failing_close(self: SQLiteEngine, conn: sqlite3.Connection) -> None:
        real_close(self, conn)
        raise sqlite3.ProgrammingError("close failed")

    monkeypatch.setattr(SQLiteEngine, "rollback", failing_rollback)
    monkeypatch.setattr(SQLiteEngine, "close", failing_close)
    with pytest.warns(ResourceWarning, match=r"\['memory-plan', 'open-plan'\]"):
        del handler
        gc.collect()
    monkeypatch.undo()
    assert fd_count() == baseline
    assert rows(db_path, "SELECT v FROM t") == []
    assert rows(other_path, "SELECT v FROM t") == [("committed",)]
