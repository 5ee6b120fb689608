"""The reaper: one daemon thread per handler that acts on deadlines as they fall due.

It keeps a heap of deadlines and sleeps until the earliest one; with nothing
scheduled it sleeps without a timeout, so an idle handler causes no wake-ups.
The thread holds only a weak reference to its handler: a forgotten handler can
still be collected, and its finalizer stops the thread.

The heap has a lock of its own, re-entrant on purpose: a garbage collection can
start on the reaper thread while it holds that lock, and collect a forgotten
handler whose finalizer then stops this very reaper. With a plain lock that
thread would wait for itself forever (and, inside the collector, stop garbage
collection for the whole process).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Rebuild the heap when more than half of it (and at least this many entries)
# are cancelled, so finished plans do not pile up until their old deadlines.
_COMPACT_MIN = 64


class Deadline:
    """A scheduled call on the handler; cancel it when it no longer applies.

    ``done`` is set once it is no longer pending: cancelled, or handed to the
    handler.
    """

    __slots__ = ("done", "key", "when")

    def __init__(self, when: float, key: Any) -> None:
        self.when = when
        self.key = key
        self.done = False


class _Target(Protocol):
    def _on_deadlines(self, due: list[Any], now: float) -> None: ...


class Reaper:
    """A deadline heap and the lazily started thread that serves it.

    The handler may schedule and cancel while holding its own lock; the
    reaper never calls the handler with its lock held, so the two locks are
    only ever taken in that order.
    """

    def __init__(
        self,
        handler: _Target,
        *,
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._handler_ref = weakref.ref(handler)
        self._wakeup = threading.Condition(threading.RLock())
        self._heap: list[tuple[float, int, Deadline]] = []
        self._counter = itertools.count()
        self._cancelled = 0
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._name = name
        self._clock = clock

    @property
    def thread(self) -> threading.Thread | None:
        """The reaper thread, once started."""
        return self._thread

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def schedule(self, when: float, key: Any) -> Deadline:
        """Call the handler with *key* at *when*.

        :raises RuntimeError: the thread could not be started; nothing is scheduled.
        """
        deadline = Deadline(when, key)
        with self._wakeup:
            if self._stopped:
                deadline.done = True
                return deadline
            heapq.heappush(self._heap, (when, next(self._counter), deadline))
            if self._thread is None:
                thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                try:
                    thread.start()
                except BaseException:
                    self.cancel(deadline)
                    raise
                self._thread = thread  # only a thread that runs is ever joined
            elif self._heap[0][2] is deadline:
                self._wakeup.notify()
        return deadline

    def cancel(self, deadline: Deadline) -> None:
        """Forget *deadline*; a deadline already handed over is left alone."""
        with self._wakeup:
            if deadline.done:
                return
            deadline.done = True
            self._cancelled += 1
            if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(self._heap):
                self._heap = [entry for entry in self._heap if not entry[2].done]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def stop(self, *, join: bool = True) -> None:
        """Stop the thread and wait for it (unless called from the thread itself)."""
        with self._wakeup:
            self._stopped = True
            self._heap.clear()
            self._cancelled = 0
            self._wakeup.notify()
            thread = self._thread
        if join and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _take_due(self) -> tuple[list[Any], float] | None:
        """Sleep until something is due; return it, or ``None`` once stopped."""
        with self._wakeup:
            while not self._stopped:
                now = self._clock()
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                    self._cancelled -= 1
                if self._heap and self._heap[0][0] <= now:
                    due = []
                    while self._heap and self._heap[0][0] <= now:
                        deadline = heapq.heappop(self._heap)[2]
                        if deadline.done:
                            self._cancelled -= 1
                        else:
                            deadline.done = True
                            due.append(deadline.key)
                    return due, now
                if self._stopped:
                    break  # stopped by a finalizer that ran on this thread just now
                self._wakeup.wait(self._heap[0][0] - now if self._heap else None)
            return None

    def _run(self) -> None:
        while (taken := self._take_due()) is not None:
            handler = self._handler_ref()
            if handler is None:
                return
            try:
                handler._on_deadlines(*taken)
            except Exception:
                # The reaper must outlive any one failure, or every later plan
                # would be left unreaped; the error is logged with its traceback.
                logger.exception("reaper of %s failed; it keeps running", self._name)
            del handler
