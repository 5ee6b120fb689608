"""The write turnstile alone: threads and locks only, no database, no sleeps."""

from __future__ import annotations

import _thread
import threading

import pytest

from cleveragents.resource.handlers._turnstile import Turnstile


def _wait_in_line(turnstile: Turnstile, mutex: threading.Lock, count: int) -> None:
    while True:
        with mutex:
            if len(turnstile) >= count:
                return


def test_a_free_turn_is_taken_at_once_and_handed_on_in_order() -> None:
    mutex = threading.Lock()
    turnstile = Turnstile(mutex)
    with mutex:
        assert turnstile.try_take("first")
        assert not turnstile.try_take("second")
    order: list[str] = []

    def waiter(plan_id: str) -> None:
        assert turnstile.acquire(plan_id, 30.0)
        order.append(plan_id)
        with mutex:
            turnstile.release()

    threads = []
    for number, plan_id in enumerate(["second", "third", "fourth"], start=1):
        thread = threading.Thread(target=waiter, args=(plan_id,))
        thread.start()
        _wait_in_line(turnstile, mutex, number)  # each queues before the next starts
        threads.append(thread)
    with mutex:
        turnstile.release()
    for thread in threads:
        thread.join(30)
    assert order == ["second", "third", "fourth"]
    assert turnstile.holder is None and len(turnstile) == 0


def test_a_waiter_that_times_out_leaves_the_line() -> None:
    mutex = threading.Lock()
    turnstile = Turnstile(mutex)
    with mutex:
        turnstile.try_take("holder")
    assert not turnstile.acquire("late", 0.0)
    assert len(turnstile) == 0
    assert turnstile.holder == "holder"


def test_close_turns_every_waiter_away_at_once() -> None:
    mutex = threading.Lock()
    turnstile = Turnstile(mutex)
    with mutex:
        turnstile.try_take("holder")
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda p=p: results.append(turnstile.acquire(p, 60.0)))
        for p in ("a", "b")
    ]
    for number, thread in enumerate(threads, start=1):
        thread.start()
        _wait_in_line(turnstile, mutex, number)
    with mutex:
        turnstile.close()
    for thread in threads:
        thread.join(30)
    assert results == [False, False]
    assert turnstile.closed
    with mutex:
        turnstile.release()
        assert not turnstile.try_take("new")
    assert not turnstile.acquire("new", 60.0)  # returns at once


def test_an_interrupted_waiter_leaves_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    mutex = threading.Lock()
    turnstile = Turnstile(mutex)
    with mutex:
        turnstile.try_take("holder")

    class Gate:
        """A gate whose wait is interrupted, as Ctrl-C interrupts a real one."""

        def __init__(self) -> None:
            self._lock = _thread.allocate_lock()

        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            if blocking and timeout != -1:
                raise KeyboardInterrupt
            return self._lock.acquire(blocking)

        def release(self) -> None:
            self._lock.release()

    monkeypatch.setattr(threading, "Lock", Gate)  # only the waiter's gate is made meanwhile
    with pytest.raises(KeyboardInterrupt):
        turnstile.acquire("interrupted", 60.0)
    monkeypatch.undo()
    assert len(turnstile) == 0
    with mutex:
        turnstile.release()
        assert turnstile.holder is None
