"""The reaper on its own: deadlines in order, cancelling, stopping, surviving a failing target."""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

import pytest

from cleveragents.resource.reaper import Reaper


class _Target:
    """Records the deadlines the reaper hands over."""

    def __init__(self, *, fail_first: bool = False) -> None:
        self.lock = threading.Lock()
        self.calls: list[list[Any]] = []
        self.fail_first = fail_first
        self.called = threading.Event()

    def _on_deadlines(self, due: list[Any], now: float) -> None:
        self.calls.append(due)
        self.called.set()
        if self.fail_first and len(self.calls) == 1:
            raise RuntimeError("target failed")


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def target() -> _Target:
    return _Target()


def _reaper(target: _Target) -> Reaper:
    return Reaper(target, name="test-reaper")


def test_no_thread_until_something_is_scheduled(target: _Target) -> None:
    reaper = _reaper(target)
    assert reaper.thread is None
    assert len(reaper) == 0
    with target.lock:
        reaper.schedule(time.monotonic() + 60, "later")
    assert reaper.thread is not None and reaper.thread.daemon
    assert len(reaper) == 1
    reaper.stop()
    assert not reaper.thread.is_alive()
    assert len(reaper) == 0


def test_deadlines_fall_due_in_time_order(target: _Target) -> None:
    reaper = _reaper(target)
    now = time.monotonic()
    with target.lock:
        reaper.schedule(now + 0.3, "third")
        reaper.schedule(now + 0.1, "first")
        reaper.schedule(now + 0.2, "second")
    _wait_for(lambda: sum(len(c) for c in target.calls) == 3)
    assert [key for call in target.calls for key in call] == ["first", "second", "third"]
    reaper.stop()


def test_an_earlier_deadline_wakes_a_sleeping_reaper(target: _Target) -> None:
    reaper = _reaper(target)
    with target.lock:
        reaper.schedule(time.monotonic() + 60, "much later")
    time.sleep(0.05)  # the thread now sleeps for a minute
    with target.lock:
        reaper.schedule(time.monotonic() + 0.05, "soon")
    assert target.called.wait(10)
    assert target.calls == [["soon"]]
    reaper.stop()


def test_cancelled_deadlines_are_not_delivered(target: _Target) -> None:
    reaper = _reaper(target)
    now = time.monotonic()
    with target.lock:
        kept = reaper.schedule(now + 0.1, "kept")
        dropped = [reaper.schedule(now + 0.05, f"dropped {i}") for i in range(100)]
        for deadline in dropped:
            reaper.cancel(deadline)
        reaper.cancel(dropped[0])  # twice is harmless
        assert len(reaper) == 1
    assert target.called.wait(10)
    time.sleep(0.1)
    assert target.calls == [["kept"]]
    assert kept.done  # delivered deadlines are spent
    reaper.stop()


def test_a_failing_target_is_logged_and_the_reaper_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = _Target(fail_first=True)
    reaper = _reaper(target)
    with caplog.at_level(logging.ERROR, logger="cleveragents.resource.reaper"):
        with target.lock:
            reaper.schedule(time.monotonic(), "fails")
        _wait_for(lambda: len(target.calls) == 1)
        with target.lock:
            reaper.schedule(time.monotonic(), "still served")
        _wait_for(lambda: len(target.calls) == 2)
    assert target.calls == [["fails"], ["still served"]]
    assert "reaper of test-reaper failed; it keeps running" in caplog.text
    reaper.stop()


def test_scheduling_after_stop_does_nothing(target: _Target) -> None:
    reaper = _reaper(target)
    reaper.stop()
    with target.lock:
        deadline = reaper.schedule(time.monotonic(), "too late")
    assert deadline.done
    assert reaper.thread is None
    assert len(reaper) == 0


def test_the_thread_ends_when_its_target_is_collected() -> None:
    target = _Target()
    reaper = _reaper(target)
    with target.lock:
        reaper.schedule(time.monotonic() + 0.2, "orphaned")
    thread = reaper.thread
    assert thread is not None
    del target
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def test_stop_from_the_reaper_thread_itself_does_not_deadlock(target: _Target) -> None:
    reaper = _reaper(target)
    stopped = threading.Event()

    def stop_from_inside(due: list[Any], now: float) -> None:
        reaper.stop()
        stopped.set()

    target._on_deadlines = stop_from_inside  # type: ignore[method-assign]
    with target.lock:
        reaper.schedule(time.monotonic(), "stop")
    assert stopped.wait(10)
    assert reaper.thread is not None
    reaper.thread.join(10)
    assert not reaper.thread.is_alive()
