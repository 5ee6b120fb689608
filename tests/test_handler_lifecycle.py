"""Handler lifecycle: reaper, idle timeout, bounded descriptors, async twins, close, fork, GC."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from cleveragents.errors import (
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


def _reaper_threads(handler: DatabaseResourceHandler) -> list[threading.Thread]:
    name = f"cleveragents-reaper[{handler.name}]"
    return [thread for thread in threading.enumerate() if thread.name == name]


def _insert(handler: DatabaseResourceHandler, resource: Resource, plan_id: str, value: str) -> None:
    with handler.connection(resource, plan_id) as conn:
        conn.execute("INSERT INTO t VALUES (?)", (value,))


# -- the reaper -------------------------------------------------------------------------


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
    wait_until(lambda: handler.stats().open_connections == 0)
    wait_until(lambda: bool(waits) and waits[-1] is None)
    settled = len(waits)
    time.sleep(0.5)
    assert len(waits) == settled  # no wake-ups while idle
    assert all(timeout is None or timeout > 0.05 for timeout in waits)  # no polling
    assert len(waits) <= 6


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


# -- garbage collection -----------------------------------------------------------------------


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
