"""Lifecycle edges found in review: interrupted waits, GC on the reaper thread, close races."""

from __future__ import annotations

import gc
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cleveragents.resource import Resource
from cleveragents.resource.handlers import _finalize as finalize_module
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.resource.handlers.sqlite import SQLiteEngine

MakeHandler = Callable[..., DatabaseResourceHandler]
Rows = Callable[..., list[tuple[Any, ...]]]


def _database(path: Path | str, **options: Any) -> Resource:
    return Resource(name="db", kind="database", engine="sqlite", location=str(path), **options)


@pytest.fixture
def alarm_interrupts() -> Iterator[Callable[[float], None]]:
    """Raise KeyboardInterrupt in the main thread after a delay, like Ctrl-C."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, on_alarm)
    yield lambda delay: signal.setitimer(signal.ITIMER_REAL, delay)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_ctrl_c_while_waiting_for_the_write_turn_does_not_block_the_database(
    make_handler: MakeHandler, db_path: Path, alarm_interrupts: Callable[[float], None]
) -> None:
    handler = make_handler(max_connections=4)
    resource = _database(db_path, busy_timeout=5.0)
    handler.create_checkpoint(resource, "holder", "a")
    alarm_interrupts(0.2)
    with pytest.raises(KeyboardInterrupt):
        handler.create_checkpoint(resource, "waiter", "a")  # waits for holder's turn
    handler.release_plan("holder")

    started = time.monotonic()
    handler.create_checkpoint(resource, "next", "a")  # gets the turn at once
    assert time.monotonic() - started < 2.0
    assert handler.stats().active_plans == 1
    handler.release_plan("next")


def test_a_forgotten_handler_collected_on_its_own_reaper_thread_is_freed(
    db_path: Path, file_fds: Callable[[Path], int]
) -> None:
    resource = _database(db_path, checkpoint_ttl=0.2)
    gc.collect()
    gc.disable()
    threshold = gc.get_threshold()
    try:
        handler = DatabaseResourceHandler()
        handler.create_checkpoint(resource, "p1", "a")
        (reaper,) = [
            thread
            for thread in threading.enumerate()
            if thread.name == f"cleveragents-reaper[{handler.name}]"
        ]
        cycle: list[Any] = [handler]
        cycle.append(cycle)  # only the cyclic collector can free it now
        del handler, cycle
        # The next container allocated anywhere collects: the reaper thread
        # allocates under its lock when the plan falls due.
        gc.set_threshold(1)
        with pytest.warns(ResourceWarning, match="was not closed"):
            gc.enable()
            reaper.join(5)
            gc.collect()
    finally:
        gc.set_threshold(*threshold)
        gc.enable()
    assert not reaper.is_alive()
    assert file_fds(db_path) == 0


def test_close_waits_for_a_release_already_committing(
    make_handler: MakeHandler, monkeypatch: pytest.MonkeyPatch, rows: Rows, db_path: Path
) -> None:
    handler = make_handler()
    memory = Resource(name="mem", kind="database", engine="sqlite", location=":memory:")
    on_file = _database(db_path)
    handler.execute(memory, "p1", "CREATE TABLE t (v)")
    handler.execute(on_file, "p1", "INSERT INTO t VALUES ('kept')")
    committing, go_on = threading.Event(), threading.Event()
    real_commit = SQLiteEngine.commit

    def slow_commit(engine: SQLiteEngine, conn: Any) -> None:
        committing.set()
        go_on.wait(10)
        real_commit(engine, conn)

    monkeypatch.setattr(SQLiteEngine, "commit", slow_commit)
    errors: list[BaseException] = []

    def release() -> None:
        try:
            handler.release_plan("p1")
        except BaseException as exc:
            errors.append(exc)

    releasing = threading.Thread(target=release)
    releasing.start()
    assert committing.wait(10)
    closing = threading.Thread(target=handler.close)
    closing.start()
    closing.join(0.3)
    assert closing.is_alive()  # waits for the release under way
    go_on.set()
    releasing.join(10)
    closing.join(10)

    assert errors == []
    assert rows(db_path, "SELECT v FROM t") == [("kept",)]
    assert handler.stats().open_connections == 0


def test_a_reaper_that_fails_to_start_leaves_nothing_half_made(
    make_handler: MakeHandler, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = make_handler()
    resource = _database(db_path, checkpoint_ttl=0.2)
    real_start = threading.Thread.start

    def failing_start(thread: threading.Thread) -> None:
        monkeypatch.setattr(threading.Thread, "start", real_start)  # once only
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", failing_start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        handler.create_checkpoint(resource, "p1", "a")
    assert handler.stats().active_plans == 0
    assert handler.stats().open_connections == 0

    handler.create_checkpoint(resource, "p2", "a")  # the reaper starts this time
    deadline = time.monotonic() + 10
    while handler.stats().reaped == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert handler.stats().reaped == 1
    handler.close()


def test_a_forked_child_keeps_nothing_of_the_handlers_it_inherited(
    db_path: Path, make_handler: MakeHandler
) -> None:
    handler = make_handler()
    handler.create_checkpoint(_database(db_path), "p1", "a")
    before = len(finalize_module._INHERITED)
    handler._forget_after_fork()  # what the at-fork hook does in a child
    try:
        kept = finalize_module._INHERITED[before:]
        assert kept and all(handler not in entry for entry in kept)
    finally:
        del finalize_module._INHERITED[before:]
